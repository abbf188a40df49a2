//! waterbear: a microVM monitor for x86_64 Linux/KVM on the rust-vmm crates.
//!
//! The library owns everything but argument parsing: VM and vCPU lifecycle and boot
//! (`vmm`), emulated devices (`devices`) and logging set-up (`logger`).

pub mod api;
pub mod devices;
pub mod logger;
pub mod snapshot;
pub mod vmm;
