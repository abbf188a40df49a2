//! Host-level work across every VM under a state root: the inventory (`inventory`),
//! phase 3 of the recovery workflow — save every VM and kexec (`reset`), bring every
//! saved VM back (`restore_all`) — phase 2's diagnostics bundle (`diagnose`), the
//! escalation through the phases (`recover`) and preparing a persistent-memory state
//! root (`prepare`).
//!
//! VMs are found by walking the state root; nothing else is a registry. A running VM is
//! one whose `vmm.lock` is held; a saved VM is one whose directory holds `vm.state`.

pub mod diagnose;
pub mod inventory;
pub mod kexec;
pub mod prepare;
pub mod recover;
pub mod reset;
pub mod restore_all;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read state root {path}")]
    StateRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{count} VM(s) keep their memory or a disk where a host reset does not preserve it: {names}; move the memory to a DAX filesystem and the disks off tmpfs, or pass --force to lose those VMs")]
    NotResettable { count: usize, names: String },
    #[error("saving VM {id} failed: {reason}")]
    Save { id: String, reason: String },
    #[error(transparent)]
    Kexec(#[from] kexec::KexecError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Prepare(#[from] prepare::PrepareError),
    #[error("{0}")]
    Failed(String),
}
