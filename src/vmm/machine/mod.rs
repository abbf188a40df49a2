//! A VM while it exists: its memory, KVM objects, devices and vCPU threads, and the
//! operations on it: pause, resume and shutdown here, saving in `snapshot`, the live
//! update in `live_update`. `restore.rs` orders the reverse of the save.

mod live_update;
mod snapshot;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use serde::Serialize;

use super::config::{SerialMode, VmConfig};
use super::control::MachineApi;
use super::devices::Devices;
use super::events::{EventLoop, LoopEnd};
use super::memory::GuestRam;
use super::saved::{self, SavedMemory};
use super::state_dir::StateDir;
use super::update::{self, Handoff, UpdateReport};
use super::vcpu::{self, ExitSignal, GuestExit, Vcpu, VcpuHandle};
use super::{RunOutcome, VmmError};
use crate::api::{ApiServer, ApiSocket};
use crate::devices::bus::lock;

/// A VM built and ready to run: the machine and its not yet started vCPUs.
pub struct Vmm {
    machine: Machine,
    vcpus: Vec<Vcpu>,
    start_paused: bool,
}

/// What a snapshot did, as reported to the user.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    pub dir: PathBuf,
    /// How long the guest was paused for the snapshot, in milliseconds.
    pub blackout_ms: f64,
    pub memory: SavedMemory,
    /// Whether the snapshot can be restored: false once a guest on memory kept in
    /// place has resumed, since that memory no longer matches the saved vCPU state, and
    /// false when a disk's path no longer names the file the VM has open.
    pub restorable: bool,
    pub paused: bool,
}

/// The live VM.
pub struct Machine {
    config: VmConfig,
    // Field order is drop order: vCPU threads and the VM go before the memory they map.
    vcpus: Vec<VcpuHandle>,
    vm: VmFd,
    _kvm: Kvm,
    ram: GuestRam,
    devices: Devices,
    state_dir: StateDir,
    exit: Arc<ExitSignal>,
    paused: bool,
    /// A memory file whose snapshot marker stays valid while the guest stays paused.
    snapshot_memory: Option<PathBuf>,
    started: Instant,
    /// Milliseconds from the process start to the vCPUs running.
    startup_ms: Option<f64>,
    last_snapshot: Option<SnapshotReport>,
    /// The API socket until the event loop's server takes it; its path stays known.
    api_socket: Option<ApiSocket>,
    api_path: Option<PathBuf>,
    api_listener_fd: Option<std::os::fd::RawFd>,
    /// The running binary, kept open so that a failed update can fall back to it.
    self_exe: Option<std::fs::File>,
    generation: u64,
    last_update: Option<UpdateReport>,
    pending_update: Option<PathBuf>,
    update_started_ns: Option<u64>,
    terminal: Option<Vec<u8>>,
}

impl Vmm {
    pub fn new(machine: Machine, vcpus: Vec<Vcpu>, start_paused: bool) -> Self {
        Vmm {
            machine,
            vcpus,
            start_paused,
        }
    }

    pub fn config(&self) -> &VmConfig {
        &self.machine.config
    }

    /// Marks this VM as the continuation of a live update: the blackout is measured
    /// from `handoff.pause_started_ns` and reported in `GET /vm`.
    pub fn continue_update(&mut self, handoff: &Handoff) {
        let m = &mut self.machine;
        m.snapshot_memory = handoff.snapshot_memory.clone();
        m.generation = handoff.generation + 1;
        m.update_started_ns = Some(handoff.pause_started_ns);
        m.terminal = handoff.terminal.clone();
        m.last_update = Some(UpdateReport {
            generation: m.generation,
            binary: handoff.binary.clone(),
            blackout_ms: 0.0,
            outcome: if handoff.failure.is_some() {
                "fallback".into()
            } else {
                "updated".into()
            },
            error: handoff.failure.clone(),
        });
    }

    /// Records the terminal attributes to restore when the VMM finally exits (handed
    /// over across live updates).
    pub fn set_terminal(&mut self, terminal: Option<Vec<u8>>) {
        self.machine.terminal = terminal;
    }

    /// Starts the vCPUs and runs the event loop until the guest stops, the VMM is
    /// signalled, or a shutdown is requested; then tears the VM down. A live update
    /// requested through the API replaces the process from inside this call.
    pub fn run(self) -> Result<RunOutcome, VmmError> {
        let Vmm {
            mut machine,
            vcpus,
            start_paused,
        } = self;
        vcpu::install_kick_handler()?;
        let serial_input = match machine.config.serial {
            SerialMode::Stdio => Some((
                machine.devices.serial.clone(),
                &machine.devices.serial_input_ready,
            )),
            _ => None,
        };
        let mut event_loop = EventLoop::new(
            machine.exit.clone(),
            &machine.devices.reset_evt,
            serial_input,
        )?;

        for vcpu in vcpus {
            let handle = vcpu.start(
                machine.devices.pio.clone(),
                machine.devices.mmio.clone(),
                machine.exit.clone(),
                start_paused,
            );
            match handle {
                Ok(h) => machine.vcpus.push(h),
                Err(e) => {
                    machine.teardown();
                    return Err(e.into());
                }
            }
        }
        machine.paused = start_paused;
        if !start_paused {
            // A restored device may have had requests in flight: process them now.
            machine.devices.virtio.resume();
        }
        machine.startup_ms = Some(crate::process_age_ms());
        machine.note_update_blackout();
        log::info!("VM {} running", machine.config.id);

        if !machine.devices.virtio.is_empty() {
            match machine.devices.virtio.subscriber() {
                Ok(queues) => event_loop.add_subscriber(Arc::new(Mutex::new(queues))),
                Err(e) => {
                    drop(event_loop);
                    machine.teardown();
                    return Err(e.into());
                }
            }
        }
        let api_socket = machine.api_socket.take();
        let machine = Arc::new(Mutex::new(machine));
        if let Some(socket) = api_socket {
            let handler = Box::new(MachineApi::new(machine.clone()));
            match ApiServer::new(socket, handler) {
                Ok(server) => event_loop.add_subscriber(Arc::new(Mutex::new(server))),
                Err(e) => {
                    drop(event_loop);
                    take_machine(machine).teardown();
                    return Err(e.into());
                }
            }
        }

        let end = loop {
            match event_loop.run_until_exit() {
                Ok(LoopEnd::Guest(GuestExit::UpdateRequested)) => {
                    // Returns only when the update could not happen; the guest runs on.
                    let err = lock(&machine).live_update();
                    log::error!("live update failed, the VM runs on: {err}");
                }
                other => break other,
            }
        };
        drop(event_loop);
        let mut machine = take_machine(machine);
        let outcome = match end {
            Ok(LoopEnd::Guest(GuestExit::Reset(why))) => {
                RunOutcome::GuestStopped(format!("guest reset ({why})"))
            }
            Ok(LoopEnd::Guest(GuestExit::Poweroff)) => {
                RunOutcome::GuestStopped("guest powered off".into())
            }
            Ok(LoopEnd::Guest(GuestExit::Requested(why))) => RunOutcome::GuestStopped(why.into()),
            Ok(LoopEnd::Guest(GuestExit::UpdateRequested)) => unreachable!("handled in the loop"),
            Ok(LoopEnd::Guest(GuestExit::Failed(why))) => RunOutcome::GuestFailed(why),
            Ok(LoopEnd::Signal(sig)) => RunOutcome::Signalled(sig),
            Err(e) => {
                machine.teardown();
                return Err(e);
            }
        };
        log::info!(
            "VM {} stopped after {:.3} s: {outcome:?}",
            machine.config.id,
            machine.started.elapsed().as_secs_f64()
        );
        machine.teardown();
        Ok(outcome)
    }
}

/// Takes the machine back once the event loop (and with it the API handler) is gone.
fn take_machine(machine: Arc<Mutex<Machine>>) -> Machine {
    match Arc::try_unwrap(machine) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(_) => unreachable!("the event loop is gone, so nothing else holds the machine"),
    }
}

impl Machine {
    pub fn new(
        config: VmConfig,
        kvm: Kvm,
        vm: VmFd,
        ram: GuestRam,
        devices: Devices,
        state_dir: StateDir,
        api_socket: Option<ApiSocket>,
    ) -> Self {
        let exit = Arc::new(ExitSignal::new().expect("an eventfd can be created"));
        let api_path = api_socket.as_ref().map(|s| s.path().to_path_buf());
        let api_listener_fd = api_socket.as_ref().map(ApiSocket::listener_fd);
        let self_exe = update::open_self_exe()
            .map_err(|e| log::warn!("cannot open the running binary; a failed live update cannot fall back to it: {e}"))
            .ok();
        Machine {
            config,
            vcpus: Vec::new(),
            vm,
            _kvm: kvm,
            ram,
            devices,
            state_dir,
            exit,
            paused: false,
            snapshot_memory: None,
            started: Instant::now(),
            startup_ms: None,
            last_snapshot: None,
            api_socket,
            api_path,
            api_listener_fd,
            self_exe,
            generation: 0,
            last_update: None,
            pending_update: None,
            update_started_ns: None,
            terminal: None,
        }
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops the vCPU threads, flushes the console and cleans the state directory.
    fn teardown(&mut self) {
        for h in self.vcpus.drain(..) {
            h.stop();
        }
        self.devices.serial_pump.finish();
        if let Some(path) = &self.api_path {
            let _ = std::fs::remove_file(path);
        }
        self.state_dir.remove();
        if let Some(t) = self
            .terminal
            .as_deref()
            .and_then(update::terminal_from_bytes)
        {
            // SAFETY: restores attributes read earlier from the same terminal.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        }
    }

    /// Pauses every vCPU; returns how long it took. Pausing a paused VM does nothing.
    pub fn pause(&mut self) -> Result<Duration, VmmError> {
        let t = Instant::now();
        if self.paused {
            return Ok(Duration::ZERO);
        }
        // Ask all first, then wait: the vCPUs stop in parallel.
        for h in &self.vcpus {
            h.request_pause()?;
        }
        for h in &self.vcpus {
            h.wait_paused()?;
        }
        self.devices.virtio.pause();
        self.paused = true;
        log::info!("VM {} paused in {:.3} ms", self.config.id, ms(t.elapsed()));
        Ok(t.elapsed())
    }

    /// Resumes every vCPU. Memory kept in place changes from here on, so a snapshot that
    /// referenced it stops being restorable.
    pub fn resume(&mut self) -> Result<Duration, VmmError> {
        let t = Instant::now();
        if !self.paused {
            return Ok(Duration::ZERO);
        }
        if let Some(path) = self.snapshot_memory.take() {
            saved::clear_marker(&path);
            if let Some(r) = self.last_snapshot.as_mut() {
                r.restorable = false;
            }
        }
        self.devices.virtio.resume();
        for h in &self.vcpus {
            h.resume()?;
        }
        self.paused = false;
        log::info!("VM {} resumed in {:.3} ms", self.config.id, ms(t.elapsed()));
        Ok(t.elapsed())
    }

    /// Asks the VM to stop; the event loop ends and the VMM exits.
    pub fn request_shutdown(&self) {
        self.exit
            .request(GuestExit::Requested("shutdown requested through the API"));
    }

    /// A summary for `GET /vm`.
    pub fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.config.id,
            "pid": std::process::id(),
            "state": if self.paused { "paused" } else { "running" },
            "vcpus": self.config.cpus,
            "memory": {
                "bytes": self.ram.size(),
                "backend": self.ram.backend(),
            },
            "kernel": self.config.kernel,
            "devices": self.devices.virtio.info(),
            "state_dir": self.state_dir.path(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "startup_ms": self.startup_ms,
            "last_snapshot": self.last_snapshot,
            "generation": self.generation,
            "last_update": self.last_update,
            "api_socket": self.api_path,
            "waterbear_version": env!("CARGO_PKG_VERSION"),
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
