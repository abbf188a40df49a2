//! `run`, `restore`, `snapshot inspect` and the receiving side of a live update: the
//! subcommands that run a VM in this process.

use std::path::PathBuf;

use clap::Subcommand;
use log::LevelFilter;
use waterbear::vmm::config::devices::{check_devices, parse_disk, parse_net};
use waterbear::vmm::config::{
    self, check_id, parse_size, KernelSource, MemoryBackend, SerialMode, VmConfig,
};
use waterbear::vmm::restore::{restore_from_dir, RestoreOptions};
use waterbear::vmm::update;
use waterbear::vmm::{builder, RunOutcome, Vmm};

use crate::{init_logging, report, LogArgs, EXIT_ERROR, EXIT_GUEST_FAILED, EXIT_OK};

#[derive(Subcommand)]
pub(crate) enum SnapshotCommand {
    /// Check a state file (vm.state) and print its header and contents as JSON.
    Inspect {
        /// The state file, or a snapshot directory holding vm.state.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
pub(crate) struct RestoreArgs {
    /// Snapshot directory written by `snapshot` (holds vm.state and vm.json).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,

    /// Where the first serial port goes: stdio, file=PATH or null [default: as saved].
    #[arg(long, value_name = "MODE")]
    serial: Option<String>,

    /// The restored VM's state directory [default: as saved].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Leave the vCPUs paused after the restore (resume through the API).
    #[arg(long)]
    paused: bool,

    /// Copy the snapshot's memory into a new memfd instead of mapping it in place: slower
    /// (the cost grows with memory size) but the snapshot stays restorable.
    #[arg(long)]
    copy_memory: bool,

    /// The control API socket [default: as saved, or <state-dir>/api.sock].
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,

    #[command(flatten)]
    log: LogArgs,
}

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Kernel to boot: an uncompressed ELF vmlinux (PVH entry used when present) or a
    /// bzImage. Without it, the built-in test guest boots.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"; for the built-in
    /// guest, its parameters such as "ticks=20 tick_ms=100"].
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,

    /// Number of vCPUs (every one comes up in the guest).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u8,

    /// Guest RAM, e.g. 512M or 2G (a bare number means MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    memory: String,

    /// Guest RAM backend: memfd (survives a VMM re-exec) or hugepages (a memfd of huge
    /// pages; the size must be a multiple of the huge page size).
    #[arg(
        long,
        value_name = "KIND",
        default_value = "memfd",
        conflicts_with = "memory_file"
    )]
    memory_backend: String,

    /// Back guest RAM with this file (on tmpfs, hugetlbfs or a DAX filesystem), mapped
    /// shared. Created at the right size if missing; an existing file must have exactly
    /// the --memory size.
    #[arg(long, value_name = "PATH")]
    memory_file: Option<PathBuf>,

    /// Where the first serial port goes: stdio (stdin feeds the guest), file=PATH, null.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    serial: String,

    /// The control API socket (mode 0600) [default: <state-dir>/api.sock].
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,

    /// A virtio-blk disk: path=FILE[,readonly=on][,id=NAME]. Repeat for more disks; the
    /// guest sees them as vda, vdb, ... in this order, each with its id (default diskN) as
    /// its serial. With readonly=on the file is opened read-only and the guest cannot write.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<String>,

    /// A virtio-net interface on an existing tap: tap=NAME[,mac=MAC]. Repeat for more
    /// interfaces (eth0, eth1, ... after the disks). The default MAC is derived from the
    /// VM id, so it stays the same across restarts.
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<String>,

    /// How the guest finds the virtio devices: acpi (in the DSDT, for kernels with ACPI,
    /// distribution kernels included) or cmdline (virtio_mmio.device= entries appended to
    /// the kernel command line, for kernels without ACPI; the VM then has no ACPI tables).
    #[arg(long, value_name = "HOW", default_value = "acpi")]
    virtio_discovery: String,

    /// Name of the VM; names its state directory [default: vm-<pid>].
    #[arg(long, value_name = "NAME")]
    id: Option<String>,

    /// The VM's state directory [default: /var/lib/waterbear/vms/<id>].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    #[command(flatten)]
    log: LogArgs,
}

impl RunArgs {
    fn into_config(self) -> Result<VmConfig, config::ConfigError> {
        let id = self
            .id
            .unwrap_or_else(|| format!("vm-{}", std::process::id()));
        check_id(&id)?;
        let memory = match self.memory_file {
            Some(path) => MemoryBackend::File { path },
            None => self.memory_backend.parse()?,
        };
        let kernel = match self.kernel {
            Some(path) => KernelSource::Path { path },
            None => KernelSource::Builtin,
        };
        let cmdline = match (self.cmdline, &kernel) {
            (Some(c), _) => c,
            (None, KernelSource::Builtin) => String::new(),
            (None, KernelSource::Path { .. }) => config::DEFAULT_CMDLINE.to_string(),
        };
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_STATE_ROOT).join(&id));
        let disks = (self.disks.iter().enumerate())
            .map(|(i, d)| parse_disk(d, i))
            .collect::<Result<Vec<_>, _>>()?;
        let nets = (self.nets.iter().enumerate())
            .map(|(i, n)| parse_net(n, &id, i))
            .collect::<Result<Vec<_>, _>>()?;
        let virtio_discovery = self.virtio_discovery.parse()?;
        check_devices(&disks, &nets, virtio_discovery)?;
        Ok(VmConfig {
            id,
            kernel,
            initrd: self.initrd,
            cmdline,
            cpus: self.cpus,
            memory_bytes: parse_size(&self.memory)?,
            memory,
            serial: self.serial.parse::<SerialMode>()?,
            api_socket: Some(
                self.api_socket
                    .unwrap_or_else(|| state_dir.join("api.sock")),
            ),
            state_dir,
            disks,
            nets,
            virtio_discovery,
        })
    }
}

/// Puts a terminal stdin into raw mode for the guest console and restores it on drop.
pub(crate) struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enter() -> Self {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with valid termios pointers.
        unsafe {
            if libc::isatty(libc::STDIN_FILENO) != 1 {
                return RawTerminal(None);
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return RawTerminal(None);
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            // Keep output post-processing so the VMM's own messages still end lines.
            raw.c_oflag = saved.c_oflag;
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw);
            RawTerminal(Some(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the attributes read from the same descriptor.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

pub(crate) fn run(args: RunArgs) -> u8 {
    if let Err(code) = init_logging(&args.log) {
        return code;
    }
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    match builder::build(config) {
        Ok(vmm) => run_vmm(vmm),
        Err(e) => {
            report(&e);
            EXIT_ERROR
        }
    }
}

pub(crate) fn restore(args: RestoreArgs) -> u8 {
    if let Err(code) = init_logging(&args.log) {
        return code;
    }
    let serial = match args
        .serial
        .as_deref()
        .map(str::parse::<SerialMode>)
        .transpose()
    {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    let opts = RestoreOptions {
        serial,
        state_dir: args.state_dir,
        api_socket: args.api_socket,
        start_paused: args.paused,
        copy_memory: args.copy_memory,
        snapshot_dir: None,
        state_dir_owned: None,
    };
    match restore_from_dir(&args.from, &opts) {
        Ok(vmm) => run_vmm(vmm),
        Err(e) => {
            report(&e);
            EXIT_ERROR
        }
    }
}

pub(crate) fn inspect(file: PathBuf) -> u8 {
    let path = if file.is_dir() {
        file.join(waterbear::vmm::saved::STATE_FILE)
    } else {
        file
    };
    match waterbear::snapshot::inspect::inspect(&path) {
        Ok(v) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&v).expect("JSON values serialise")
            );
            EXIT_OK
        }
        Err(e) => {
            report(&e);
            EXIT_ERROR
        }
    }
}

pub(crate) fn run_vmm(mut vmm: Vmm) -> u8 {
    let stdio = vmm.config().serial == SerialMode::Stdio;
    let terminal = stdio.then(RawTerminal::enter);
    vmm.set_terminal(
        terminal
            .as_ref()
            .and_then(|t| t.0.as_ref())
            .map(update::terminal_bytes),
    );
    run_started(vmm)
}

pub(crate) fn run_started(vmm: Vmm) -> u8 {
    match vmm.run() {
        Ok(RunOutcome::GuestStopped(why)) => {
            log::info!("{why}; exiting");
            EXIT_OK
        }
        Ok(RunOutcome::GuestFailed(why)) => {
            eprintln!("waterbear: the guest failed: {why}");
            if waterbear::logger::logs_to_file() {
                log::error!("the guest failed: {why}");
            }
            EXIT_GUEST_FAILED
        }
        Ok(RunOutcome::Signalled(sig)) => 128u8.wrapping_add(sig as u8),
        Err(e) => {
            report(&e);
            EXIT_ERROR
        }
    }
}

/// The receiving side of a live update: restore from the hand-over and run; if that
/// fails, execute the previous binary with the same hand-over.
pub(crate) fn resume_update(handoff_fd: i32) -> u8 {
    let handoff = match update::read_handoff(handoff_fd) {
        Ok(h) => h,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    let level = handoff.log_level.parse().unwrap_or(LevelFilter::Warn);
    if let Err(e) = waterbear::logger::init(level, handoff.log_file.as_deref()) {
        report(&e);
    }
    match waterbear::vmm::restore::restore_from_handoff(&handoff) {
        Ok(vmm) => run_started(vmm),
        Err(e) => {
            report(&e);
            fall_back(handoff, e.to_string())
        }
    }
}

/// Executes the binary that handed over, telling it why the new one failed.
pub(crate) fn fall_back(mut handoff: update::Handoff, error: String) -> u8 {
    if let Some(first) = &handoff.failure {
        eprintln!(
            "waterbear: error: the fallback restore failed too (after: {first}); the guest is lost"
        );
        return EXIT_ERROR;
    }
    log::error!(
        "live update to {} failed ({error}); falling back",
        handoff.binary.display()
    );
    handoff.failure = Some(error);
    let exe = handoff.fallback_exe_fd;
    match update::write_handoff(&handoff) {
        Ok(fd) => report(&update::exec_fd(exe, std::os::fd::AsRawFd::as_raw_fd(&fd))),
        Err(e) => report(&e),
    }
    EXIT_ERROR
}
