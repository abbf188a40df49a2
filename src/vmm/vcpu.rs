//! vCPU set-up and the per-vCPU run loop.
//!
//! Each vCPU runs `KVM_RUN` in its own thread and handles port I/O exits through the
//! bus. Other threads stop a vCPU by setting its stop flag and sending it the kick
//! signal, whose handler sets `immediate_exit` in that thread's `kvm_run` so that a
//! kick arriving just before `KVM_RUN` is not lost.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_run, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::boot::kernel::{BootError, EntryPoint};
use super::boot::regs::{boot_fpu, boot_regs, boot_sregs};
use super::msr::boot_msrs;
use super::state::{restore_vcpu, save_vcpu, saveable_msrs, StateError, VcpuState};
use crate::devices::bus::{MmioBus, PioBus};

/// How long a vCPU thread may take to answer a pause, resume or save request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// LAPIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set {what} on vCPU {index}")]
    Set {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {total} boot MSRs on vCPU {index}")]
    ShortMsrs { index: u8, set: usize, total: usize },
    #[error("cannot set up the boot state of vCPU {index}")]
    Boot { index: u8, source: BootError },
    #[error("cannot start the thread of vCPU {index}")]
    Thread { index: u8, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot restore vCPU {index}")]
    Restore { index: u8, source: StateError },
    #[error("cannot save vCPU {index}")]
    Save { index: u8, source: StateError },
    #[error("vCPU {index} has stopped and cannot take requests")]
    Gone { index: u8 },
    #[error("vCPU {index} did not answer a {what} request within {REQUEST_TIMEOUT:?}")]
    Timeout { index: u8, what: &'static str },
    #[error("vCPU {index} must be paused to be saved")]
    NotPaused { index: u8 },
}

/// What other threads ask of a vCPU thread.
enum Request {
    Pause,
    Resume,
    Save,
    Exit,
}

/// A vCPU thread's answers.
enum Reply {
    Paused,
    Resumed,
    Saved(Box<Result<VcpuState, VcpuError>>),
}

/// Why the guest stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest asked for a reset (i8042, triple fault, or KVM reset event).
    Reset(&'static str),
    /// The guest powered itself off.
    Poweroff,
    /// The VMM was asked to stop the VM (API shutdown).
    Requested(&'static str),
    /// A live update was requested: the event loop hands control back to carry it out.
    UpdateRequested,
    /// A vCPU hit an error the guest cannot recover from.
    Failed(String),
}

/// Collects the first reason the guest stopped and wakes the event loop.
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<GuestExit>>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            reason: Mutex::new(None),
        })
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Records `exit` unless an earlier reason is already recorded.
    pub fn request(&self, exit: GuestExit) {
        let mut reason = crate::devices::bus::lock(&self.reason);
        if reason.is_none() {
            *reason = Some(exit);
        }
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot signal the guest exit: {e}");
        }
    }

    pub fn take(&self) -> Option<GuestExit> {
        crate::devices::bus::lock(&self.reason).take()
    }
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the run
            // loop before the first KVM_RUN and valid until the VcpuFd is dropped, which
            // happens only after the loop cleared it. A byte store is signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler; call once before starting vCPU threads.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

/// One vCPU, configured and ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// MSRs this vCPU saves (probed once its CPUID is set).
    msr_indices: Vec<u32>,
    /// The CPUID table this vCPU was given.
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    xsave_bytes: usize,
    /// Tell the guest it was paused (KVMCLOCK_CTRL) before it first runs again.
    notify_pause: bool,
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        let xsave_bytes = super::state::xsave_size(vm);
        Ok(Vcpu {
            index,
            fd,
            msr_indices: Vec::new(),
            cpuid: Vec::new(),
            xsave_bytes,
            notify_pause: false,
        })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// Loads a saved state into this (new) vCPU; its CPUID comes from the state.
    pub fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        restore_vcpu(&self.fd, state).map_err(|source| VcpuError::Restore {
            index: self.index,
            source,
        })?;
        self.msr_indices = state.msrs.iter().map(|e| e.index).collect();
        self.cpuid = state.cpuid.clone();
        self.notify_pause = true;
        Ok(())
    }

    /// Probes which MSRs this vCPU can save; call after `configure`.
    pub fn probe_msrs(&mut self, kvm: &kvm_ioctls::Kvm) {
        self.msr_indices = saveable_msrs(kvm, &self.fd);
    }

    fn save(&self) -> Result<VcpuState, VcpuError> {
        save_vcpu(
            &self.fd,
            self.index,
            &self.cpuid,
            &self.msr_indices,
            self.xsave_bytes,
        )
        .map_err(|source| VcpuError::Save {
            index: self.index,
            source,
        })
    }

    fn set_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Set {
            index,
            what,
            source,
        }
    }

    /// Sets CPUID, boot MSRs, and the LAPIC's LINT0/LINT1 wiring; for the boot vCPU
    /// also the registers of the kernel entry.
    pub fn configure(
        &mut self,
        cpuid: &CpuId,
        boot: Option<(&GuestMemoryMmap, EntryPoint)>,
    ) -> Result<(), VcpuError> {
        self.fd.set_cpuid2(cpuid).map_err(self.set_err("CPUID"))?;
        self.cpuid = cpuid.as_slice().to_vec();

        let msrs = boot_msrs();
        let set = self.fd.set_msrs(&msrs).map_err(self.set_err("MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::ShortMsrs {
                index: self.index,
                set,
                total: msrs.as_slice().len(),
            });
        }

        self.set_lint()?;
        self.fd.set_fpu(&boot_fpu()).map_err(self.set_err("FPU"))?;

        if let Some((mem, entry)) = boot {
            let sregs = self
                .fd
                .get_sregs()
                .map_err(self.set_err("special registers"))?;
            let sregs = boot_sregs(mem, entry, sregs).map_err(|source| VcpuError::Boot {
                index: self.index,
                source,
            })?;
            self.fd
                .set_sregs(&sregs)
                .map_err(self.set_err("special registers"))?;
            self.fd
                .set_regs(&boot_regs(entry))
                .map_err(self.set_err("registers"))?;
        }
        Ok(())
    }

    /// Routes the PIC's output to LINT0 (ExtINT) and NMIs to LINT1, as firmware does.
    fn set_lint(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(self.set_err("LAPIC"))?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let mut bytes = [0u8; 4];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = lapic.regs[offset + i] as u8;
            }
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[offset + i] = *b as _;
            }
        }
        self.fd.set_lapic(&lapic).map_err(self.set_err("LAPIC"))
    }

    /// Starts the run loop in its own thread, running or paused.
    pub fn start(
        self,
        pio: Arc<PioBus>,
        mmio: Arc<MmioBus>,
        exit: Arc<ExitSignal>,
        paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let (req_tx, req_rx) = channel();
        let (reply_tx, reply_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(&pio, &mmio, &exit, req_rx, reply_tx, paused))
            .map_err(|source| VcpuError::Thread { index, source })?;
        Ok(VcpuHandle {
            index,
            thread,
            requests: req_tx,
            replies: reply_rx,
        })
    }

    fn run(
        mut self,
        pio: &PioBus,
        mmio: &MmioBus,
        exit: &ExitSignal,
        requests: Receiver<Request>,
        replies: Sender<Reply>,
        mut paused: bool,
    ) {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        loop {
            let request = if paused {
                match requests.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                }
            } else {
                match requests.try_recv() {
                    Ok(r) => Some(r),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            };
            let reply = match request {
                Some(Request::Exit) => break,
                Some(Request::Pause) => {
                    if !paused {
                        self.complete_pending_exit();
                        paused = true;
                    }
                    Some(Reply::Paused)
                }
                Some(Request::Resume) => {
                    paused = false;
                    Some(Reply::Resumed)
                }
                Some(Request::Save) => Some(Reply::Saved(Box::new(if paused {
                    self.save()
                } else {
                    Err(VcpuError::NotPaused { index: self.index })
                }))),
                None => None,
            };
            if let Some(reply) = reply {
                if replies.send(reply).is_err() {
                    break;
                }
                continue;
            }
            if self.notify_pause {
                self.notify_pause = false;
                // Fails with EINVAL when the guest has no kvmclock; nothing to tell then.
                let _ = self.fd.kvmclock_ctrl();
            }
            if let Some(reason) = self.run_once(pio, mmio) {
                exit.request(reason);
                break;
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Lets KVM finish the instruction of the last exit (the data of an `in`, say)
    /// without running further guest code, so the saved registers are consistent.
    fn complete_pending_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => log::debug!(
                "vcpu{}: completing the last exit gave {other:?}",
                self.index
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Runs the vCPU until one exit is handled; returns a reason when the guest stopped.
    fn run_once(&mut self, pio: &PioBus, mmio: &MmioBus) -> Option<GuestExit> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(port, data) {
                    log::debug!("vcpu{index}: in from unclaimed port {port:#x}");
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !pio.write(port, data) {
                    log::debug!("vcpu{index}: out to unclaimed port {port:#x}");
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    log::debug!("vcpu{index}: read of unclaimed MMIO {addr:#x}");
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !mmio.write(addr, data) {
                    log::debug!("vcpu{index}: write to unclaimed MMIO {addr:#x}");
                }
                None
            }
            Ok(VcpuExit::Shutdown) => Some(GuestExit::Reset("triple fault")),
            Ok(VcpuExit::Hlt) => Some(GuestExit::Poweroff),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_RESET => Some(GuestExit::Reset("KVM reset event")),
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(GuestExit::Poweroff),
                KVM_SYSTEM_EVENT_CRASH => Some(GuestExit::Failed(format!("vcpu{index}: guest crashed"))),
                other => Some(GuestExit::Failed(format!("vcpu{index}: unknown system event {other}"))),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(GuestExit::Failed(format!(
                "vcpu{index}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM fills the `internal` member of the exit union for
                // KVM_EXIT_INTERNAL_ERROR, the exit being handled here.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Some(GuestExit::Failed(format!(
                    "vcpu{index}: KVM internal error (suberror {suberror}); the guest executed something KVM cannot emulate"
                )))
            }
            Ok(other) => Some(GuestExit::Failed(format!("vcpu{index}: unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(GuestExit::Failed(format!("vcpu{index}: KVM_RUN failed: {e}"))),
        }
    }
}

/// A vCPU thread, running or paused.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    requests: Sender<Request>,
    replies: Receiver<Reply>,
}

impl VcpuHandle {
    pub fn index(&self) -> u8 {
        self.index
    }

    fn kick(&self) {
        if let Err(e) = self.thread.kill(kick_signal()) {
            log::debug!("kicking vCPU {} failed: {e}", self.index);
        }
    }

    fn send(&self, request: Request) -> Result<(), VcpuError> {
        self.requests
            .send(request)
            .map_err(|_| VcpuError::Gone { index: self.index })?;
        self.kick();
        Ok(())
    }

    fn reply(&self, what: &'static str) -> Result<Reply, VcpuError> {
        self.replies
            .recv_timeout(REQUEST_TIMEOUT)
            .map_err(|e| match e {
                RecvTimeoutError::Timeout => VcpuError::Timeout {
                    index: self.index,
                    what,
                },
                RecvTimeoutError::Disconnected => VcpuError::Gone { index: self.index },
            })
    }

    /// Asks the vCPU to pause; `wait_paused` waits for it to have done so.
    pub fn request_pause(&self) -> Result<(), VcpuError> {
        self.send(Request::Pause)
    }

    pub fn wait_paused(&self) -> Result<(), VcpuError> {
        match self.reply("pause")? {
            Reply::Paused => Ok(()),
            _ => Err(VcpuError::Timeout {
                index: self.index,
                what: "pause",
            }),
        }
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(Request::Resume)?;
        match self.reply("resume")? {
            Reply::Resumed => Ok(()),
            _ => Err(VcpuError::Timeout {
                index: self.index,
                what: "resume",
            }),
        }
    }

    /// Reads the state of the (paused) vCPU.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        self.send(Request::Save)?;
        match self.reply("save")? {
            Reply::Saved(result) => *result,
            _ => Err(VcpuError::Timeout {
                index: self.index,
                what: "save",
            }),
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(self) {
        let _ = self.send(Request::Exit);
        let _ = self.thread.join();
    }
}
