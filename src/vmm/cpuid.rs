//! The CPUID each vCPU sees: KVM's supported set with the topology of one socket of N cores,
//! one thread each, and this vCPU's APIC ID filled in.
//!
//! This module owns the leaves that describe topology and identity (0x1, 0x4, 0xB, 0x1F,
//! 0x8000_0001, 0x8000_0008, 0x8000_001D, 0x8000_001E) and the hypervisor bit. It leaves every
//! other leaf as KVM reports it, including KVM's own 0x4000_0000 range, and it does not decide
//! which features to offer: it never sets a feature bit KVM did not report, and it does not call
//! `KVM_SET_CPUID2` (the vCPU does, once, before its first `KVM_RUN`).
//!
//! APIC IDs are the vCPU indexes, as in the MP table (`boot::mptable`).
//!
//! Leaf 0xA (architectural performance monitoring) is kept as KVM reports it: KVM already
//! describes only what its virtual PMU implements (and zeroes the leaf when the PMU is off
//! host-wide), and the counter MSRs are in KVM's MSR save list, so they survive a snapshot.
//! A VMM that turns the PMU off for one VM (`KVM_CAP_PMU_CAPABILITY`) must clear the leaf
//! itself, since the supported set is host-wide.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};

/// Failures while building a vCPU's CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The guest has no vCPU.
    #[error("A guest needs at least one vCPU")]
    NoCpus,
    /// The vCPU index is not below the vCPU count.
    #[error("The vCPU id {vcpu_id} is out of range for a guest of {num_cpus} vCPUs")]
    VcpuIdOutOfRange { vcpu_id: u8, num_cpus: u8 },
    /// Adding the topology sub-leaves made the list longer than KVM takes.
    #[error("The vCPU's CPUID would have {count} entries, more than the {max} KVM accepts")]
    TooManyEntries { count: usize, max: usize },
}

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_X2APIC_TOPOLOGY: u32 = 0xb;
const LEAF_V2_TOPOLOGY: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE: u32 = 0x8000_001d;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

// Leaf 0x1.
const EBX_BRAND_INDEX_MASK: u32 = 0xff;
const EBX_CLFLUSH_SHIFT: u32 = 8;
/// CLFLUSH line size in 8-byte units: 64 bytes, as on every x86-64 processor.
const CLFLUSH_LINE_QWORDS: u32 = 8;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const EBX_APIC_ID_SHIFT: u32 = 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

// Leaves 0x4 and 0x8000_001D.
const CACHE_TYPE_MASK: u32 = 0x1f;
const CACHE_LEVEL_SHIFT: u32 = 5;
const CACHE_LEVEL_MASK: u32 = 0x7;
const CACHE_SHARING_SHIFT: u32 = 14;
const CACHE_SHARING_MAX: u32 = 0xfff;
const CACHE_CORES_SHIFT: u32 = 26;
const CACHE_CORES_MAX: u32 = 0x3f;

// Leaves 0xB and 0x1F.
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
const LEVEL_TYPE_SHIFT: u32 = 8;

// Leaf 0x8000_0001.
const ECX_CMP_LEGACY: u32 = 1 << 1;

// Leaf 0x8000_0008.
const ECX_NC_MASK: u32 = 0xff;
const ECX_APIC_ID_SIZE_SHIFT: u32 = 12;
const ECX_APIC_ID_SIZE_MASK: u32 = 0xf << ECX_APIC_ID_SIZE_SHIFT;

/// Where this vCPU sits in a package of `num_cpus` single-threaded cores.
#[derive(Clone, Copy)]
struct Topology {
    vcpu_id: u8,
    num_cpus: u8,
}

impl Topology {
    /// Bits of the APIC ID that number the cores: ceil(log2(num_cpus)).
    fn core_bits(self) -> u32 {
        u32::BITS - (u32::from(self.num_cpus) - 1).leading_zeros()
    }

    fn apic_id(self) -> u32 {
        u32::from(self.vcpu_id)
    }

    fn last_cpu(self) -> u32 {
        u32::from(self.num_cpus) - 1
    }
}

/// The CPU vendor, which decides whether the AMD topology fields apply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vendor {
    /// AMD or Hygon: topology also lives in the 0x8000_00xx leaves.
    Amd,
    Other,
}

impl Vendor {
    fn of(entries: &[kvm_cpuid_entry2]) -> Self {
        let Some(leaf0) = entries.iter().find(|e| e.function == LEAF_VENDOR) else {
            return Vendor::Other;
        };
        let mut name = [0u8; 12];
        name[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        name[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
        match &name {
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }
}

/// Builds the CPUID for vCPU `vcpu_id` of a guest of `num_cpus` vCPUs from `supported`, the
/// result of `Kvm::get_supported_cpuid`.
pub fn vcpu_cpuid(supported: &CpuId, vcpu_id: u8, num_cpus: u8) -> Result<CpuId, CpuidError> {
    if num_cpus == 0 {
        return Err(CpuidError::NoCpus);
    }
    if vcpu_id >= num_cpus {
        return Err(CpuidError::VcpuIdOutOfRange { vcpu_id, num_cpus });
    }
    let topology = Topology { vcpu_id, num_cpus };
    let supported = supported.as_slice();
    let vendor = Vendor::of(supported);

    let mut entries = Vec::with_capacity(supported.len() + 4);
    let mut topology_leaves_done = Vec::with_capacity(2);
    for entry in supported {
        if matches!(entry.function, LEAF_X2APIC_TOPOLOGY | LEAF_V2_TOPOLOGY) {
            // KVM reports only sub-leaf 0 (older kernels the host's sub-leaves); either way
            // the guest gets our complete set once, in place of all of them.
            if !topology_leaves_done.contains(&entry.function) {
                topology_leaves_done.push(entry.function);
                entries.extend(x2apic_topology(entry.function, topology));
            }
            continue;
        }
        let mut entry = *entry;
        update_entry(&mut entry, vendor, topology);
        entries.push(entry);
    }

    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries {
        count: entries.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })
}

fn update_entry(entry: &mut kvm_cpuid_entry2, vendor: Vendor, topology: Topology) {
    // Sub-leaf entries (leaves 0x4, 0x8000_001D) are each updated from their own contents;
    // the other leaves here have no sub-leaves, so only an entry for sub-leaf 0 counts.
    let is_leaf_entry = entry.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || entry.index == 0;
    match entry.function {
        LEAF_FEATURES if is_leaf_entry => update_features(entry, topology),
        LEAF_CACHE => update_cache(entry, topology, true),
        LEAF_EXT_FEATURES if is_leaf_entry && vendor == Vendor::Amd => {
            // CmpLegacy says the logical processors of leaf 0x1 are cores, not threads.
            set_bit(&mut entry.ecx, ECX_CMP_LEGACY, topology.num_cpus > 1);
        }
        LEAF_EXT_ADDRESS_SIZES if is_leaf_entry && vendor == Vendor::Amd => {
            entry.ecx &= !(ECX_NC_MASK | ECX_APIC_ID_SIZE_MASK);
            entry.ecx |= topology.last_cpu() | (topology.core_bits() << ECX_APIC_ID_SIZE_SHIFT);
        }
        LEAF_AMD_CACHE => update_cache(entry, topology, false),
        LEAF_AMD_TOPOLOGY if is_leaf_entry => {
            entry.eax = topology.apic_id(); // Extended APIC ID.
            entry.ebx = topology.apic_id(); // Core ID; EBX[15:8] = threads per core - 1 = 0.
            entry.ecx = 0; // Node 0 of one node per package.
            entry.edx = 0;
        }
        _ => {}
    }
}

fn update_features(entry: &mut kvm_cpuid_entry2, topology: Topology) {
    entry.ebx = (entry.ebx & EBX_BRAND_INDEX_MASK)
        | (CLFLUSH_LINE_QWORDS << EBX_CLFLUSH_SHIFT)
        | (u32::from(topology.num_cpus) << EBX_LOGICAL_COUNT_SHIFT)
        | (topology.apic_id() << EBX_APIC_ID_SHIFT);
    // TSC-deadline (ECX bit 24) and x2APIC (bit 21) stay as KVM reported them.
    entry.ecx |= ECX_HYPERVISOR;
    // HTT means EBX[23:16] is valid and counts more than one logical processor.
    set_bit(&mut entry.edx, EDX_HTT, topology.num_cpus > 1);
}

/// Rewrites the sharing fields of one deterministic cache parameters sub-leaf (Intel leaf 0x4
/// or AMD leaf 0x8000_001D). L1 and L2 belong to one core, hence one thread; L3 and beyond are
/// shared by the whole package. `with_core_count` also sets leaf 0x4's EAX[31:26].
fn update_cache(entry: &mut kvm_cpuid_entry2, topology: Topology, with_core_count: bool) {
    if entry.eax & CACHE_TYPE_MASK == 0 {
        return; // Null sub-leaf: no more caches.
    }
    let level = (entry.eax >> CACHE_LEVEL_SHIFT) & CACHE_LEVEL_MASK;
    let sharing = if level >= 3 { topology.last_cpu() } else { 0 };
    entry.eax &= !(CACHE_SHARING_MAX << CACHE_SHARING_SHIFT);
    entry.eax |= sharing.min(CACHE_SHARING_MAX) << CACHE_SHARING_SHIFT;
    if with_core_count {
        // The field holds at most 64 cores; larger guests rely on leaf 0xB instead.
        entry.eax &= !(CACHE_CORES_MAX << CACHE_CORES_SHIFT);
        entry.eax |= topology.last_cpu().min(CACHE_CORES_MAX) << CACHE_CORES_SHIFT;
    }
}

/// The sub-leaves of leaf 0xB or 0x1F: an SMT level of one thread, a core level spanning the
/// package, then the invalid level that ends the list. EDX is the x2APIC ID on every one.
fn x2apic_topology(function: u32, topology: Topology) -> [kvm_cpuid_entry2; 3] {
    let level = |index: u32, level_type: u32, shift: u32, count: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: count,
        ecx: index | (level_type << LEVEL_TYPE_SHIFT),
        edx: topology.apic_id(),
        ..Default::default()
    };
    let cores = u32::from(topology.num_cpus);
    [
        level(0, LEVEL_TYPE_SMT, 0, 1),
        level(1, LEVEL_TYPE_CORE, topology.core_bits(), cores),
        level(2, LEVEL_TYPE_INVALID, 0, 0),
    ]
}

fn set_bit(register: &mut u32, bit: u32, on: bool) {
    if on {
        *register |= bit;
    } else {
        *register &= !bit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNIFICANT: u32 = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    const TSC_DEADLINE: u32 = 1 << 24;
    const TOPOEXT: u32 = 1 << 22;

    fn entry(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// An entry for a leaf without sub-leaves.
    fn leaf(function: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        entry(function, 0, 0, regs)
    }

    /// An entry for one sub-leaf of a leaf with sub-leaves.
    fn subleaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        entry(function, index, SIGNIFICANT, regs)
    }

    fn vendor_leaf(max_leaf: u32, name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let reg = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        leaf(LEAF_VENDOR, [max_leaf, reg(0), reg(8), reg(4)])
    }

    /// A deterministic cache sub-leaf as a host with 2 threads per core and 16 per L3 has it.
    fn cache(function: u32, index: u32, cache_type: u32, level: u32) -> kvm_cpuid_entry2 {
        let sharing = if level == 3 { 15 } else { 1 };
        let eax = cache_type | (level << 5) | (1 << 8) | (sharing << 14) | (7 << 26);
        subleaf(function, index, [eax, 0x01c0_003f, 0x3f, 0])
    }

    fn cache_subleaves(function: u32) -> Vec<kvm_cpuid_entry2> {
        vec![
            cache(function, 0, 1, 1),
            cache(function, 1, 2, 1),
            cache(function, 2, 3, 2),
            cache(function, 3, 3, 3),
            subleaf(function, 4, [0; 4]),
        ]
    }

    /// What KVM reports on an Intel host: leaf 0x1 carries the host's APIC ID, 0xB and 0x1F
    /// have only a zeroed sub-leaf 0.
    fn intel_entries() -> Vec<kvm_cpuid_entry2> {
        let mut entries = vec![
            vendor_leaf(0x1f, b"GenuineIntel"),
            leaf(
                LEAF_FEATURES,
                [0x906ea, 0x0510_0800, 0x76fa_3203, 0x1f8b_fbff],
            ),
        ];
        entries.extend(cache_subleaves(LEAF_CACHE));
        entries.extend([
            leaf(0xa, [0x0730_0404, 0, 0, 0x603]),
            subleaf(LEAF_X2APIC_TOPOLOGY, 0, [0; 4]),
            subleaf(LEAF_V2_TOPOLOGY, 0, [0; 4]),
            leaf(0x4000_0000, [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d]),
            leaf(0x4000_0001, [0x0100_7afb, 0, 0, 0]),
            leaf(0x8000_0000, [0x8000_0008, 0, 0, 0]),
            leaf(LEAF_EXT_FEATURES, [0, 0, 0x121, 0x2c10_0800]),
            leaf(LEAF_EXT_ADDRESS_SIZES, [0x3027, 0, 0, 0]),
        ]);
        entries
    }

    /// What KVM reports on an AMD host: the host's CmpLegacy and core count, a zeroed
    /// 0x8000_001E.
    fn amd_entries() -> Vec<kvm_cpuid_entry2> {
        let mut entries = vec![
            vendor_leaf(0x10, b"AuthenticAMD"),
            leaf(
                LEAF_FEATURES,
                [0xa20f10, 0x0310_0800, 0x7ef8_3203, 0x178b_fbff],
            ),
            subleaf(LEAF_X2APIC_TOPOLOGY, 0, [0; 4]),
            leaf(0x8000_0000, [0x8000_0021, 0, 0, 0]),
            leaf(
                LEAF_EXT_FEATURES,
                [0, 0, 0x75c2_37ff | TOPOEXT, 0x2fd3_fbff],
            ),
            leaf(LEAF_EXT_ADDRESS_SIZES, [0x3030, 0, 0x0001_700f, 0]),
        ];
        entries.extend(cache_subleaves(LEAF_AMD_CACHE));
        entries.push(leaf(LEAF_AMD_TOPOLOGY, [0; 4]));
        entries
    }

    fn build(entries: &[kvm_cpuid_entry2], vcpu_id: u8, num_cpus: u8) -> CpuId {
        let supported = CpuId::from_entries(entries).unwrap();
        vcpu_cpuid(&supported, vcpu_id, num_cpus).unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        let matches: Vec<_> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == function && e.index == index)
            .collect();
        assert_eq!(matches.len(), 1, "entries for {function:#x}.{index}");
        *matches[0]
    }

    fn subleaves(cpuid: &CpuId, function: u32) -> Vec<kvm_cpuid_entry2> {
        let mut found: Vec<_> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == function)
            .copied()
            .collect();
        found.sort_by_key(|e| e.index);
        found
    }

    fn functions(entries: &[kvm_cpuid_entry2]) -> Vec<u32> {
        let mut functions: Vec<u32> = entries.iter().map(|e| e.function).collect();
        functions.sort_unstable();
        functions.dedup();
        functions
    }

    #[test]
    fn leaf1_has_each_vcpus_apic_id_and_the_logical_count() {
        for num_cpus in [1, 2, 3, 16, 254] {
            for vcpu_id in 0..num_cpus {
                let leaf1 = find(
                    &build(&intel_entries(), vcpu_id, num_cpus),
                    LEAF_FEATURES,
                    0,
                );

                assert_eq!(leaf1.ebx >> 24, u32::from(vcpu_id), "APIC ID");
                assert_eq!(
                    (leaf1.ebx >> 16) & 0xff,
                    u32::from(num_cpus),
                    "logical count"
                );
                assert_eq!((leaf1.ebx >> 8) & 0xff, 8, "CLFLUSH size");
                assert_eq!(leaf1.ebx & 0xff, 0, "brand index");
            }
        }
    }

    #[test]
    fn hypervisor_bit_is_set() {
        for entries in [intel_entries(), amd_entries()] {
            let leaf1 = find(&build(&entries, 0, 1), LEAF_FEATURES, 0);
            assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        }
    }

    #[test]
    fn htt_is_set_only_with_more_than_one_vcpu() {
        let htt = |num_cpus| find(&build(&intel_entries(), 0, num_cpus), LEAF_FEATURES, 0).edx;
        assert_eq!(htt(1) & EDX_HTT, 0);
        assert_ne!(htt(2) & EDX_HTT, 0);
    }

    #[test]
    fn tsc_deadline_is_kept_but_never_added() {
        let mut entries = intel_entries();
        assert_eq!(entries[1].ecx & TSC_DEADLINE, 0);
        assert_eq!(
            find(&build(&entries, 0, 2), LEAF_FEATURES, 0).ecx & TSC_DEADLINE,
            0
        );

        entries[1].ecx |= TSC_DEADLINE;
        assert_ne!(
            find(&build(&entries, 0, 2), LEAF_FEATURES, 0).ecx & TSC_DEADLINE,
            0
        );
    }

    #[test]
    fn x2apic_topology_levels_for_1_2_3_and_16_vcpus() {
        for (num_cpus, core_shift) in [(1u8, 0u32), (2, 1), (3, 2), (16, 4)] {
            for vcpu_id in 0..num_cpus {
                let cpuid = build(&intel_entries(), vcpu_id, num_cpus);
                for function in [LEAF_X2APIC_TOPOLOGY, LEAF_V2_TOPOLOGY] {
                    let levels = subleaves(&cpuid, function);
                    let summary: Vec<(u32, u32, u32, u32)> = levels
                        .iter()
                        .map(|e| {
                            (
                                e.ecx & 0xff,
                                (e.ecx >> 8) & 0xff,
                                e.eax & 0x1f,
                                e.ebx & 0xffff,
                            )
                        })
                        .collect();

                    // (level number, level type, shift, logical processors)
                    let expected = [
                        (0, 1, 0, 1),
                        (1, 2, core_shift, u32::from(num_cpus)),
                        (2, 0, 0, 0),
                    ];
                    assert_eq!(summary, expected, "{function:#x} for {num_cpus} vCPUs");
                    for level in &levels {
                        assert_eq!(level.edx, u32::from(vcpu_id), "x2APIC ID");
                        assert_eq!(level.flags, SIGNIFICANT);
                    }
                }
            }
        }
    }

    #[test]
    fn host_topology_subleaves_are_replaced_not_duplicated() {
        let mut entries = intel_entries();
        entries.retain(|e| e.function != LEAF_X2APIC_TOPOLOGY);
        // An older KVM passed the host's levels through: 2 threads per core, 8 cores.
        entries.extend([
            subleaf(LEAF_X2APIC_TOPOLOGY, 0, [1, 2, 0x100, 7]),
            subleaf(LEAF_X2APIC_TOPOLOGY, 1, [4, 16, 0x201, 7]),
            subleaf(LEAF_X2APIC_TOPOLOGY, 2, [0, 0, 0x2, 7]),
        ]);

        let levels = subleaves(&build(&entries, 1, 4), LEAF_X2APIC_TOPOLOGY);

        assert_eq!(levels.len(), 3);
        assert_eq!((levels[0].eax, levels[0].ebx), (0, 1));
        assert_eq!((levels[1].eax, levels[1].ebx), (2, 4));
        assert!(levels.iter().all(|e| e.edx == 1));
    }

    #[test]
    fn leaves_absent_from_the_supported_set_are_not_added() {
        let mut entries = intel_entries();
        entries.retain(|e| {
            ![LEAF_CACHE, LEAF_X2APIC_TOPOLOGY, LEAF_V2_TOPOLOGY].contains(&e.function)
        });
        let cpuid = build(&entries, 0, 4);
        assert_eq!(functions(cpuid.as_slice()), functions(&entries));

        let mut entries = amd_entries();
        entries.retain(|e| ![LEAF_AMD_CACHE, LEAF_AMD_TOPOLOGY].contains(&e.function));
        let cpuid = build(&entries, 0, 4);
        assert_eq!(functions(cpuid.as_slice()), functions(&entries));
    }

    #[test]
    fn leaves_outside_the_topology_are_unchanged() {
        let entries = intel_entries();
        let cpuid = build(&entries, 2, 4);

        for function in [LEAF_VENDOR, 0xa, 0x4000_0000, 0x4000_0001, 0x8000_0000] {
            let original = entries.iter().find(|e| e.function == function).unwrap();
            assert_eq!(&find(&cpuid, function, 0), original, "leaf {function:#x}");
        }
        // Intel reserves the AMD topology fields; they are left alone there.
        for function in [LEAF_EXT_FEATURES, LEAF_EXT_ADDRESS_SIZES] {
            let original = entries.iter().find(|e| e.function == function).unwrap();
            assert_eq!(&find(&cpuid, function, 0), original, "leaf {function:#x}");
        }
    }

    #[test]
    fn cache_leaf_shares_l1_and_l2_per_core_and_l3_per_package() {
        for (function, entries) in [
            (LEAF_CACHE, intel_entries()),
            (LEAF_AMD_CACHE, amd_entries()),
        ] {
            let cpuid = build(&entries, 0, 6);
            let before: Vec<_> = entries.iter().filter(|e| e.function == function).collect();
            let after = subleaves(&cpuid, function);
            assert_eq!(after.len(), before.len());

            let sharing: Vec<u32> = after.iter().map(|e| (e.eax >> 14) & 0xfff).collect();
            assert_eq!(sharing, [0, 0, 0, 5, 0], "leaf {function:#x}");
            for (old, new) in before.iter().zip(&after) {
                assert_eq!(
                    old.eax & 0x3fff,
                    new.eax & 0x3fff,
                    "type, level and flags kept"
                );
                assert_eq!((old.ebx, old.ecx, old.edx), (new.ebx, new.ecx, new.edx));
            }
            assert_eq!(after[4], *before[4], "null sub-leaf untouched");
        }
    }

    #[test]
    fn cache_leaf_counts_cores_per_package_up_to_the_field_limit() {
        let cores = |num_cpus| {
            let cpuid = build(&intel_entries(), 0, num_cpus);
            find(&cpuid, LEAF_CACHE, 0).eax >> 26
        };
        assert_eq!(cores(1), 0);
        assert_eq!(cores(6), 5);
        assert_eq!(cores(64), 63);
        assert_eq!(cores(200), 63);
    }

    #[test]
    fn amd_leaves_describe_single_threaded_cores() {
        for num_cpus in [1u8, 3, 16] {
            for vcpu_id in 0..num_cpus {
                let cpuid = build(&amd_entries(), vcpu_id, num_cpus);

                let ext = find(&cpuid, LEAF_EXT_FEATURES, 0);
                assert_eq!(ext.ecx & ECX_CMP_LEGACY != 0, num_cpus > 1, "CmpLegacy");
                assert_ne!(ext.ecx & TOPOEXT, 0, "TOPOEXT kept");

                let sizes = find(&cpuid, LEAF_EXT_ADDRESS_SIZES, 0);
                assert_eq!(sizes.ecx & 0xff, u32::from(num_cpus) - 1, "NC");
                let apic_id_size = (sizes.ecx >> 12) & 0xf;
                assert_eq!(apic_id_size, Topology { vcpu_id, num_cpus }.core_bits());
                assert_eq!(sizes.ecx >> 16, 1, "PerfTscSize kept");

                let topo = find(&cpuid, LEAF_AMD_TOPOLOGY, 0);
                assert_eq!(topo.eax, u32::from(vcpu_id), "extended APIC ID");
                assert_eq!(topo.ebx & 0xff, u32::from(vcpu_id), "core ID");
                assert_eq!((topo.ebx >> 8) & 0xff, 0, "threads per core - 1");

                let leaf1 = find(&cpuid, LEAF_FEATURES, 0);
                assert_eq!(leaf1.ebx >> 24, u32::from(vcpu_id));
                for level in subleaves(&cpuid, LEAF_X2APIC_TOPOLOGY) {
                    assert_eq!(level.edx, u32::from(vcpu_id));
                }
            }
        }
    }

    #[test]
    fn ids_outside_the_guest_are_errors() {
        let supported = CpuId::from_entries(&intel_entries()).unwrap();

        assert!(matches!(
            vcpu_cpuid(&supported, 0, 0),
            Err(CpuidError::NoCpus)
        ));
        assert!(matches!(
            vcpu_cpuid(&supported, 4, 4),
            Err(CpuidError::VcpuIdOutOfRange {
                vcpu_id: 4,
                num_cpus: 4
            })
        ));
    }

    #[test]
    fn topology_subleaves_beyond_kvms_limit_are_an_error() {
        let mut entries = intel_entries();
        let filler = KVM_MAX_CPUID_ENTRIES - entries.len();
        entries.extend((0..filler as u32).map(|i| leaf(0x4000_0100 + i, [0; 4])));

        let supported = CpuId::from_entries(&entries).unwrap();
        let err = vcpu_cpuid(&supported, 0, 2).unwrap_err();

        assert!(matches!(
            err,
            CpuidError::TooManyEntries {
                count: 260,
                max: KVM_MAX_CPUID_ENTRIES
            }
        ));
    }
}
