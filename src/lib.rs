//! waterbear: a microVM monitor for x86_64 Linux/KVM on the rust-vmm crates.
//!
//! The library owns everything but argument parsing: VM and vCPU lifecycle and boot
//! (`vmm`), emulated devices (`devices`) and logging set-up (`logger`).

pub mod api;
pub mod bench;
pub mod devices;
pub mod host;
pub mod logger;
pub mod snapshot;
pub mod vmm;

static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Records the moment `main` began; call it first thing.
pub fn mark_process_start() {
    let _ = PROCESS_START.set(std::time::Instant::now());
}

/// Milliseconds since `main` began (see `mark_process_start`).
pub fn process_age_ms() -> f64 {
    PROCESS_START
        .get()
        .map(|t| t.elapsed().as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}
