//! VM and vCPU lifecycle, boot, CPUID, MSRs and guest memory backends.

pub mod boot;
pub mod cpuid;
