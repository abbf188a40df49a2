//! VM and vCPU lifecycle: building a VM for a fresh boot (`builder`) or from a saved
//! state (`restore`), running it with its devices and event loop (`machine`), and the
//! state that saving and restoring move around (`state`, `saved`).
//!
//! Building checks every input before it creates anything, then creates the state
//! directory, guest memory, the KVM VM, devices and vCPUs in that order; if a step
//! fails, what the earlier steps created on disk is removed again.

pub mod boot;
pub mod builder;
pub mod compat;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod events;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod msr;
pub mod restore;
pub mod saved;
pub mod state;
pub mod state_dir;
pub mod update;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use boot::kernel::BootError;
use boot::mptable::MptableError;
use config::ConfigError;
use memory::MemoryError;
use state_dir::StateDirError;
use vcpu::VcpuError;
use vm::VmError;

use crate::devices::serial::SerialError;

pub use machine::Vmm;

/// Everything that can stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error("cannot write the MP table")]
    Mptable(#[source] MptableError),
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] boot::acpi::AcpiError),
    #[error("{requested} vCPUs requested; waterbear supports at most {max}")]
    TooManyCpus { requested: u8, max: u8 },
    #[error("cannot get KVM's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot build the CPUID of vCPU {index}")]
    Cpuid {
        index: u8,
        source: cpuid::CpuidError,
    },
    #[error("cannot read the built-in test guest")]
    TestGuest(#[source] std::io::Error),
    #[error("cannot set up {what}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot wire the interrupt of {what}")]
    Irq {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the device event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Saved(#[from] saved::SavedError),
    #[error("cannot restore the serial port")]
    SerialState(#[source] crate::devices::serial::SerialStateError),
    #[error("the VM must be paused for this")]
    NotPaused,
    #[error("cannot create snapshot directory {path}")]
    SnapshotDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] crate::api::ApiServerError),
    #[error(transparent)]
    Update(#[from] update::UpdateError),
    #[error(transparent)]
    Virtio(#[from] virtio::VirtioError),
    #[error("cannot write guest memory to {path}")]
    MemoryWrite {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest reset or powered off: a normal end.
    GuestStopped(String),
    /// The guest could not go on (a KVM or vCPU error).
    GuestFailed(String),
    /// The VMM was told to stop by a signal.
    Signalled(i32),
}
