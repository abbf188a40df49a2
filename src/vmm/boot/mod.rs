//! Everything placed in guest memory and in the boot vCPU before the first `KVM_RUN`:
//! the kernel and initrd (`kernel`), the built-in test guest (`builtin`), boot
//! parameters and memory map (`params`), the MP table (`mptable`), the ACPI tables
//! (`acpi`) and the entry register state (`regs`).

pub mod acpi;
pub mod builtin;
pub mod kernel;
pub mod mptable;
pub mod params;
pub mod regs;
