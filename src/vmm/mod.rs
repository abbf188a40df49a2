//! VM and vCPU lifecycle: building a VM from a `VmConfig`, running it until the guest
//! stops, and tearing it down.
//!
//! `Vmm::build` checks every input before it creates anything, then creates the state
//! directory, guest memory, the KVM VM, devices and vCPUs in that order; if a step
//! fails, what the earlier steps created on disk is removed again. `Vmm::run` starts
//! the vCPUs and runs the device event loop on the calling thread.

pub mod boot;
pub mod config;
pub mod cpuid;
pub mod layout;
pub mod memory;
pub mod msr;
pub mod state;
pub mod state_dir;
pub mod vcpu;
pub mod vm;

pub mod events;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::PioBus;
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{
    output_for, OutputPump, SerialDevice, SerialError, COM1_BASE, COM1_IRQ, COM1_LEN,
};
use boot::builtin::{test_guest_file, TEST_GUEST_NAME};
use boot::kernel::{check_cmdline, write_cmdline, BootError, EntryPoint, Initrd, KernelImage};
use boot::mptable::{setup_mptable, MptableError, MAX_CPUS};
use boot::params::{write_boot_params, write_pvh_info, BootData};
use config::{check_memory, ConfigError, KernelSource, SerialMode, VmConfig};
use layout::{CMDLINE_START, HIMEM_START};
use memory::{backend_page_size, GuestRam, MemoryError};
use state_dir::{StateDir, StateDirError};
use vcpu::{ExitSignal, GuestExit, Vcpu, VcpuError, VcpuHandle};
use vm::VmError;

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

/// A built VM, ready to run.
pub struct Vmm {
    config: VmConfig,
    // Field order is drop order: vCPUs and the VM go before the memory they map.
    vcpus: Vec<Vcpu>,
    vm: VmFd,
    _kvm: Kvm,
    ram: GuestRam,
    pio: Arc<PioBus>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_input_ready: EventFd,
    serial_pump: OutputPump,
    reset_evt: EventFd,
    state_dir: StateDir,
}

/// The kernel input after every check that needs no guest memory.
struct CheckedKernel {
    image: KernelImage,
    initrd: Option<Initrd>,
}

fn check_inputs(config: &VmConfig) -> Result<CheckedKernel, VmmError> {
    if config.cpus == 0 {
        return Err(ConfigError::NoCpus.into());
    }
    if config.cpus > MAX_CPUS {
        return Err(VmmError::TooManyCpus {
            requested: config.cpus,
            max: MAX_CPUS,
        });
    }
    check_memory(config.memory_bytes, backend_page_size(&config.memory))?;
    let image = match &config.kernel {
        KernelSource::Path { path } => KernelImage::open(path)?,
        KernelSource::Builtin => {
            let file = test_guest_file().map_err(VmmError::TestGuest)?;
            KernelImage::from_file(std::path::Path::new(TEST_GUEST_NAME), file)?
        }
    };
    image.check_size(config.memory_bytes)?;
    check_cmdline(&config.cmdline, image.cmdline_limit())?;
    let initrd = match &config.initrd {
        Some(path) => {
            let initrd = Initrd::read(path)?;
            // A first placement check with the kernel's file size; the exact one, with
            // where the kernel really ends, follows the load.
            image.initrd_placement(
                path,
                initrd.data.len() as u64,
                HIMEM_START,
                config.memory_bytes,
            )?;
            Some(initrd)
        }
        None => None,
    };
    Ok(CheckedKernel { image, initrd })
}

impl Vmm {
    /// Checks the configuration and builds the VM. On error nothing is left on disk.
    pub fn build(config: VmConfig) -> Result<Self, VmmError> {
        let started = Instant::now();
        let checked = check_inputs(&config)?;
        let kvm = vm::open_kvm()?;
        vm::check_vcpu_count(&kvm, config.cpus)?;

        let state_dir = StateDir::acquire(&config.state_dir)?;
        let ram = match GuestRam::create(&config.memory, config.memory_bytes) {
            Ok(ram) => ram,
            Err(e) => {
                state_dir.remove();
                return Err(e.into());
            }
        };
        let parts = match assemble(&config, checked, &kvm, &ram, &state_dir) {
            Ok(parts) => parts,
            Err(e) => {
                ram.discard_if_created();
                state_dir.remove();
                return Err(e);
            }
        };
        let (vm, devices, vcpus) = parts;
        log::info!(
            "VM {} built in {} ms: {} vCPUs, {} MiB",
            config.id,
            started.elapsed().as_millis(),
            config.cpus,
            config.memory_bytes >> 20
        );
        Ok(Vmm {
            config,
            vcpus,
            vm,
            _kvm: kvm,
            ram,
            pio: Arc::new(devices.pio),
            serial: devices.serial,
            serial_input_ready: devices.serial_input_ready,
            serial_pump: devices.serial_pump,
            reset_evt: devices.reset_evt,
            state_dir,
        })
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Runs the VM until the guest stops or the VMM is signalled, then tears it down.
    pub fn run(mut self) -> Result<RunOutcome, VmmError> {
        vcpu::install_kick_handler()?;
        let exit = Arc::new(ExitSignal::new().map_err(|source| VmmError::Setup {
            what: "the exit event",
            source,
        })?);
        let mut event_loop = events::EventLoop::new(
            exit.clone(),
            &self.reset_evt,
            match self.config.serial {
                SerialMode::Stdio => Some((self.serial.clone(), &self.serial_input_ready)),
                _ => None,
            },
        )?;

        let started = Instant::now();
        let mut handles: Vec<VcpuHandle> = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            match vcpu.start(self.pio.clone(), exit.clone(), false) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop_vcpus(handles);
                    return Err(e.into());
                }
            }
        }
        log::info!("VM {} running", self.config.id);

        let outcome = event_loop.run_until_exit();
        stop_vcpus(handles);
        self.serial_pump.finish();
        let outcome = match outcome {
            Ok(events::LoopEnd::Guest(GuestExit::Reset(why))) => {
                RunOutcome::GuestStopped(format!("guest reset ({why})"))
            }
            Ok(events::LoopEnd::Guest(GuestExit::Poweroff)) => {
                RunOutcome::GuestStopped("guest powered off".into())
            }
            Ok(events::LoopEnd::Guest(GuestExit::Failed(why))) => RunOutcome::GuestFailed(why),
            Ok(events::LoopEnd::Signal(sig)) => RunOutcome::Signalled(sig),
            Err(e) => {
                self.state_dir.remove();
                return Err(e);
            }
        };
        log::info!(
            "VM {} stopped after {:.3} s: {outcome:?}",
            self.config.id,
            started.elapsed().as_secs_f64()
        );
        self.state_dir.remove();
        Ok(outcome)
    }
}

/// Creates the KVM VM, loads the guest, and creates devices and vCPUs; records the
/// configuration last, once the VM exists.
fn assemble(
    config: &VmConfig,
    checked: CheckedKernel,
    kvm: &Kvm,
    ram: &GuestRam,
    state_dir: &StateDir,
) -> Result<(VmFd, Devices, Vec<Vcpu>), VmmError> {
    let vm = vm::create_vm(kvm, ram.memory())?;
    let entry = load_guest(config, checked, ram)?;
    let devices = create_devices(&vm, &config.serial)?;
    let vcpus = create_vcpus(kvm, &vm, ram, config.cpus, entry)?;
    state_dir.write_config(config)?;
    Ok((vm, devices, vcpus))
}

fn stop_vcpus(handles: Vec<VcpuHandle>) {
    for h in handles {
        h.stop();
    }
}

/// Loads kernel, initrd, command line, boot parameters and MP table into guest memory;
/// returns the entry point.
fn load_guest(
    config: &VmConfig,
    mut checked: CheckedKernel,
    ram: &GuestRam,
) -> Result<EntryPoint, VmmError> {
    let mem = ram.memory();
    let kernel = checked.image.load(mem)?;
    let initrd = match (&checked.initrd, &config.initrd) {
        (Some(initrd), Some(path)) => {
            let size = initrd.data.len() as u64;
            let addr = checked
                .image
                .initrd_placement(path, size, kernel.kernel_end, ram.size())?;
            initrd.load(mem, addr)?;
            Some((addr, size))
        }
        _ => None,
    };
    write_cmdline(mem, CMDLINE_START, &config.cmdline)?;
    let data = BootData {
        cmdline_addr: CMDLINE_START,
        cmdline_len: config.cmdline.len(),
        initrd,
    };
    match kernel.entry {
        EntryPoint::Pvh(_) => write_pvh_info(mem, &data, ram.size())?,
        EntryPoint::Linux64(_) => write_boot_params(mem, kernel.header, &data, ram.size())?,
    }
    setup_mptable(mem, config.cpus).map_err(VmmError::Mptable)?;
    log::debug!(
        "kernel entry {:?}, kernel ends at {:#x}",
        kernel.entry,
        kernel.kernel_end
    );
    Ok(kernel.entry)
}

struct Devices {
    pio: PioBus,
    serial: Arc<Mutex<SerialDevice>>,
    serial_input_ready: EventFd,
    serial_pump: OutputPump,
    reset_evt: EventFd,
}

fn new_eventfd(what: &'static str) -> Result<EventFd, VmmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Setup { what, source })
}

fn create_devices(vm: &VmFd, serial_mode: &SerialMode) -> Result<Devices, VmmError> {
    let serial_irq = new_eventfd("the serial interrupt")?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|source| VmmError::Irq {
            what: "the serial port",
            source,
        })?;
    let input_ready = new_eventfd("the serial input event")?;
    let dup = |e: &EventFd, what| {
        e.try_clone()
            .map_err(|source| VmmError::Setup { what, source })
    };
    let (out, serial_pump) = output_for(serial_mode)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        dup(&input_ready, "the serial input event")?,
        out,
    )));
    let reset_evt = new_eventfd("the reset event")?;
    let i8042 = Arc::new(Mutex::new(I8042::new(dup(&reset_evt, "the reset event")?)));

    let mut pio = PioBus::new();
    let bus_err = |e| VmmError::Setup {
        what: "the port I/O bus",
        source: std::io::Error::other(e),
    };
    pio.insert(COM1_BASE, COM1_LEN, serial.clone())
        .map_err(bus_err)?;
    pio.insert(I8042_BASE, I8042_LEN, i8042).map_err(bus_err)?;
    Ok(Devices {
        pio,
        serial,
        serial_input_ready: input_ready,
        serial_pump,
        reset_evt,
    })
}

fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    ram: &GuestRam,
    cpus: u8,
    entry: EntryPoint,
) -> Result<Vec<Vcpu>, VmmError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::SupportedCpuid)?;
    let mut vcpus = Vec::with_capacity(cpus.into());
    for index in 0..cpus {
        let mut vcpu = Vcpu::new(vm, index)?;
        let cpuid = cpuid::vcpu_cpuid(&supported, index, cpus)
            .map_err(|source| VmmError::Cpuid { index, source })?;
        let boot = (index == 0).then_some((ram.memory(), entry));
        vcpu.configure(&cpuid, boot)?;
        vcpu.probe_msrs(kvm);
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}
