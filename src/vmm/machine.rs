//! A VM while it exists: its memory, KVM objects, devices and vCPU threads, and the
//! operations on it (pause, resume, snapshot, shutdown). One place orders the save of a
//! whole VM (`Machine::save`); `restore.rs` orders the reverse.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use serde::Serialize;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

use super::config::{MemoryBackend, SerialMode, VmConfig};
use super::control::MachineApi;
use super::devices::Devices;
use super::events::{EventLoop, LoopEnd};
use super::memory::GuestRam;
use super::saved::{self, SavedMemory, VmSnapshot};
use super::state::save_vm;
use super::state_dir::StateDir;
use super::update::{self, Handoff, UpdateError, UpdateReport};
use super::vcpu::{self, ExitSignal, GuestExit, Vcpu, VcpuHandle};
use super::{RunOutcome, VmmError};
use crate::api::{ApiServer, ApiSocket};
use crate::devices::bus::lock;
use std::os::fd::AsRawFd;

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
    /// place has resumed, since that memory no longer matches the saved vCPU state.
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
        machine.startup_ms = Some(crate::process_age_ms());
        machine.note_update_blackout();
        log::info!("VM {} running", machine.config.id);

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

    fn note_update_blackout(&mut self) {
        if let (Some(start), Some(report)) =
            (self.update_started_ns.take(), self.last_update.as_mut())
        {
            report.blackout_ms = (update::monotonic_ns().saturating_sub(start)) as f64 / 1e6;
            log::info!(
                "VM {} live update {} ({}): guest blackout {:.3} ms",
                self.config.id,
                report.generation,
                report.outcome,
                report.blackout_ms
            );
        }
    }

    /// Checks the update binary and asks the event loop to carry the update out once
    /// the API response is on its way.
    pub fn request_update(&mut self, binary: Option<PathBuf>) -> Result<PathBuf, VmmError> {
        let binary = match binary {
            Some(b) => b,
            None => std::fs::read_link("/proc/self/exe").map_err(|source| VmmError::Setup {
                what: "finding the running binary",
                source,
            })?,
        };
        update::check_binary(&binary)?;
        self.pending_update = Some(binary.clone());
        self.exit.request(GuestExit::UpdateRequested);
        Ok(binary)
    }

    /// Carries out a requested live update: pause, save, hand over, execute. Returns
    /// only if the update could not start, after resuming the guest.
    pub fn live_update(&mut self) -> UpdateError {
        let Some(binary) = self.pending_update.take() else {
            return UpdateError::Prepare {
                what: "no update was requested",
                source: std::io::Error::other("none"),
            };
        };
        let was_paused = self.paused;
        let err = self.try_exec(&binary);
        // Still here: execve failed. Take the descriptors back and let the guest run.
        for fd in [
            Some(self.ram.file().as_raw_fd()),
            self.api_listener_fd,
            self.self_exe.as_ref().map(|f| f.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        {
            let _ = update::set_cloexec(fd, true);
        }
        if !was_paused {
            if let Err(e) = self.resume() {
                log::error!("cannot resume the VM after the failed update: {e}");
            }
        }
        self.last_update = Some(UpdateReport {
            generation: self.generation,
            binary,
            blackout_ms: 0.0,
            outcome: "failed".into(),
            error: Some(err.to_string()),
        });
        err
    }

    fn try_exec(&mut self, binary: &Path) -> UpdateError {
        let pause_started_ns = update::monotonic_ns();
        if let Err(e) = self.pause() {
            return UpdateError::Prepare {
                what: "pausing the vCPUs",
                source: std::io::Error::other(e.to_string()),
            };
        }
        let memory = SavedMemory {
            path: PathBuf::new(),
            size: self.ram.size(),
            token: 0,
            copied: false,
        };
        let snapshot = match self.save(memory) {
            Ok(s) => s,
            Err(e) => {
                return UpdateError::Prepare {
                    what: "saving the VM",
                    source: std::io::Error::other(e.to_string()),
                }
            }
        };
        let Some(exe) = self.self_exe.as_ref() else {
            return UpdateError::Prepare {
                what: "the running binary",
                source: std::io::Error::other("not open"),
            };
        };
        let (log_level, log_file) = crate::logger::settings();
        let handoff = Handoff {
            snapshot,
            backend: self.ram.backend().clone(),
            memory_fd: self.ram.file().as_raw_fd(),
            api_listener_fd: self.api_listener_fd,
            fallback_exe_fd: exe.as_raw_fd(),
            pause_started_ns,
            generation: self.generation,
            binary: binary.into(),
            failure: None,
            terminal: self.terminal.clone(),
            log_level: log_level.to_string(),
            log_file,
        };
        log::debug!(
            "live update: paused and saved in {:.3} ms",
            (update::monotonic_ns() - pause_started_ns) as f64 / 1e6
        );
        let handoff_fd = match update::write_handoff(&handoff) {
            Ok(fd) => fd,
            Err(e) => return e,
        };
        for fd in handoff.descriptors() {
            if let Err(source) = update::set_cloexec(fd, false) {
                return UpdateError::Prepare {
                    what: "handing over a descriptor",
                    source,
                };
            }
        }
        self.devices.serial_pump.drain(Duration::from_millis(200));
        log::info!(
            "VM {} live update: executing {}",
            self.config.id,
            binary.display()
        );
        update::exec_binary(binary, handoff_fd.as_raw_fd())
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

    /// Reads the whole VM's state; the VM must be paused. `memory` describes where its
    /// RAM is.
    pub fn save(&self, memory: SavedMemory) -> Result<VmSnapshot, VmmError> {
        if !self.paused {
            return Err(VmmError::NotPaused);
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for h in &self.vcpus {
            vcpus.push(h.save()?);
        }
        Ok(VmSnapshot {
            config: self.config.clone(),
            memory,
            vm: save_vm(&self.vm)?,
            vcpus,
            devices: self.devices.state(),
            saved_unix_ms: saved::unix_ms(),
        })
    }

    /// Pauses the VM, writes its state to `dir` (and its memory, when that lives in a
    /// memfd), and resumes it unless `keep_paused`.
    pub fn snapshot(&mut self, dir: &Path, keep_paused: bool) -> Result<SnapshotReport, VmmError> {
        let t = Instant::now();
        std::fs::create_dir_all(dir).map_err(|source| VmmError::SnapshotDir {
            path: dir.into(),
            source,
        })?;
        let dir = dir.canonicalize().map_err(|source| VmmError::SnapshotDir {
            path: dir.into(),
            source,
        })?;
        let was_paused = self.paused;
        self.pause()?;

        let result = self.write_snapshot(&dir);
        let (memory, header_len) = match result {
            Ok(v) => v,
            Err(e) => {
                if !was_paused {
                    self.resume()?;
                }
                return Err(e);
            }
        };
        let blackout = t.elapsed();
        let stay_paused = keep_paused || was_paused;
        let mut report = SnapshotReport {
            dir: dir.clone(),
            blackout_ms: ms(blackout),
            memory,
            restorable: true,
            paused: true,
        };
        self.last_snapshot = Some(report.clone());
        if !stay_paused {
            self.resume()?;
            report.blackout_ms = ms(t.elapsed());
            report.paused = false;
            report.restorable = self.last_snapshot.as_ref().is_some_and(|r| r.restorable);
            self.last_snapshot = Some(report.clone());
        }
        log::info!(
            "VM {} snapshot to {} ({} bytes of state): guest paused {:.3} ms{}",
            self.config.id,
            dir.display(),
            header_len,
            report.blackout_ms,
            if report.restorable {
                ""
            } else {
                "; memory kept in place changed since, so the snapshot is not restorable"
            }
        );
        Ok(report)
    }

    fn write_snapshot(&mut self, dir: &Path) -> Result<(SavedMemory, u64), VmmError> {
        let token = saved::new_token();
        let memory = match self.ram.backend() {
            MemoryBackend::File { path } => {
                let path = path.canonicalize().unwrap_or_else(|_| path.clone());
                SavedMemory {
                    path,
                    size: self.ram.size(),
                    token,
                    copied: false,
                }
            }
            MemoryBackend::Memfd | MemoryBackend::Hugepages => {
                let path = dir.join(saved::MEMORY_FILE);
                write_memory(&self.ram, &path)?;
                SavedMemory {
                    path: saved::MEMORY_FILE.into(),
                    size: self.ram.size(),
                    token,
                    copied: true,
                }
            }
        };
        let snap = self.save(memory.clone())?;
        let header = saved::write_snapshot(dir, &snap)?;
        if !memory.copied {
            self.snapshot_memory = Some(memory.path.clone());
        }
        Ok((memory, header.payload_len))
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

/// Writes guest RAM to `path` atomically (temporary name, fsync, rename).
fn write_memory(ram: &GuestRam, path: &Path) -> Result<(), VmmError> {
    let werr = |source| VmmError::MemoryWrite {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        for region in ram.memory().iter() {
            let len = region.len() as usize;
            ram.memory()
                .write_all_volatile_to(region.start_addr(), &mut file, len)
                .map_err(std::io::Error::other)?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
