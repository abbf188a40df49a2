//! The `waterbear` command line. Parsing and exit codes only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use log::LevelFilter;

use waterbear::api::ApiClient;
use waterbear::vmm::config::{
    self, check_id, parse_size, KernelSource, MemoryBackend, SerialMode, VmConfig,
};
use waterbear::vmm::restore::{restore_from_dir, RestoreOptions};
use waterbear::vmm::update;
use waterbear::vmm::{builder, RunOutcome, Vmm};

/// Exit codes; docs/cli.md lists them.
const EXIT_OK: u8 = 0;
const EXIT_ERROR: u8 = 1;
const EXIT_GUEST_FAILED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "waterbear",
    version,
    about = "A microVM monitor with host-failure recovery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM and stay in the foreground until the guest reboots or powers off.
    Run(RunArgs),
    /// Bring a saved VM back in this new process from a snapshot directory, mapping its
    /// memory in place, and run it like `run` does.
    Restore(RestoreArgs),
    /// Work with snapshot files.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Control a running VM through its API socket.
    Ctl(CtlArgs),
    /// Operate the host: every VM under the state root (recovery workflow).
    Host(HostArgs),
    /// Benchmarks with the built-in guest (needs /dev/kvm); print tables, write JSON.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Internal: the re-executed VMM of a live update.
    #[command(name = "__resume-update", hide = true)]
    ResumeUpdate {
        #[arg(long)]
        handoff_fd: i32,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Per-VM restore latency (memory in place vs copied, for each size, and several
    /// VMs restored together) and the live-update blackout.
    Restore(BenchArgs),
    /// Only the live-update blackout.
    Update(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Guest memory sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "128M,512M,1G,4G")]
    sizes: Vec<String>,

    /// Numbers of VMs restored at the same time.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    vms: Vec<usize>,

    /// Live updates per memory size.
    #[arg(long, default_value_t = 10)]
    updates: usize,

    /// Directory for memory files and snapshots (tmpfs keeps disk speed out of it).
    #[arg(long, default_value = "/dev/shm")]
    work_dir: PathBuf,

    /// Write the figures as JSON here.
    #[arg(long, value_name = "PATH", default_value = "bench-restore.json")]
    json: PathBuf,

    /// Also write the tables as Markdown here.
    #[arg(long, value_name = "PATH")]
    markdown: Option<PathBuf>,
}

#[derive(clap::Args)]
struct HostArgs {
    /// The state root holding one directory per VM.
    #[arg(long, value_name = "DIR", default_value = config::DEFAULT_STATE_ROOT, global = true)]
    state_root: PathBuf,

    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    action: HostAction,
}

#[derive(clap::Args, Clone)]
struct ResetArgs {
    /// Kernel to kexec into.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Its initrd.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Its command line.
    #[arg(long, value_name = "ARGS", default_value = "")]
    append: String,
    /// Reset even though some VMs' memory does not survive it (they are lost).
    #[arg(long)]
    force: bool,
    /// Save and stop every VM, but do not kexec.
    #[arg(long)]
    no_kexec: bool,
}

#[derive(Subcommand)]
enum HostAction {
    /// List every VM: state, process, memory backend, whether it survives a host reset.
    Status,
    /// Phase 2: write a diagnostics bundle (logs, states, kernel log, pressure, KVM
    /// statistics, summary.json with findings).
    Diagnose {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Phase 3: save every VM next to its memory, then kexec into --kernel.
    Reset(ResetArgs),
    /// After a reset: restore every saved VM in place, each in its own VMM process.
    RestoreAll,
    /// Escalate: live-update every VMM (phase 1); if one is unhealthy, write the bundle
    /// (phase 2) and reset the host (phase 3). Writes a JSON timeline.
    Recover {
        #[command(flatten)]
        reset: ResetArgs,
        /// Where phase 2 writes its bundle [default: <state-root>/../diagnostics/...].
        #[arg(long, value_name = "DIR")]
        bundle: Option<PathBuf>,
        /// Where the timeline goes [default: recover-timeline.json in the bundle's parent].
        #[arg(long, value_name = "PATH")]
        timeline: Option<PathBuf>,
        /// Make a phase fail on purpose (for tests).
        #[arg(long, value_enum)]
        inject_failure: Option<waterbear::host::recover::InjectedFailure>,
    },
    /// Format (only if it holds no filesystem) and mount a persistent-memory device with
    /// DAX as the state root's filesystem.
    Prepare {
        #[arg(long, value_name = "DEVICE")]
        device: PathBuf,
        #[arg(long, value_name = "DIR")]
        mount: PathBuf,
    },
}

#[derive(clap::Args)]
struct CtlArgs {
    /// The VM's API socket (by default <state-dir>/api.sock).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,

    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand)]
enum CtlAction {
    /// Print the VM's state as JSON.
    Info,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Save the VM into DIR (created if missing) and resume it unless --keep-paused.
    Snapshot {
        dir: PathBuf,
        /// Leave the VM paused after the snapshot.
        #[arg(long)]
        keep_paused: bool,
    },
    /// Re-execute the VMM (or --binary) with the guest kept running from the same memory,
    /// and wait for the new process to report the blackout.
    Update {
        /// The waterbear binary to run instead of the current one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Stop the VM and its VMM.
    Shutdown,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Check a state file (vm.state) and print its header and contents as JSON.
    Inspect {
        /// The state file, or a snapshot directory holding vm.state.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct RestoreArgs {
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
struct LogArgs {
    /// Log level: error, warn, info or debug.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: LevelFilter,

    /// Write the log to this file (appending) instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RunArgs {
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
        })
    }
}

/// Prints an error with its chain of causes, one per line.
fn report(err: &dyn std::error::Error) {
    let mut msg = format!("waterbear: error: {err}");
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(&format!("\n  caused by: {s}"));
        source = s.source();
    }
    if waterbear::logger::logs_to_file() {
        log::error!("{}", msg.replace('\n', " "));
    }
    eprintln!("{msg}");
}

/// Puts a terminal stdin into raw mode for the guest console and restores it on drop.
struct RawTerminal(Option<libc::termios>);

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

fn init_logging(log: &LogArgs) -> Result<(), u8> {
    waterbear::logger::init(log.log_level, log.log_file.as_deref()).map_err(|e| {
        report(&e);
        EXIT_ERROR
    })
}

fn run(args: RunArgs) -> u8 {
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

fn restore(args: RestoreArgs) -> u8 {
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
    };
    match restore_from_dir(&args.from, &opts) {
        Ok(vmm) => run_vmm(vmm),
        Err(e) => {
            report(&e);
            EXIT_ERROR
        }
    }
}

fn inspect(file: PathBuf) -> u8 {
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

fn run_vmm(mut vmm: Vmm) -> u8 {
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

fn run_started(vmm: Vmm) -> u8 {
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

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialise")
    );
}

fn ctl(args: CtlArgs) -> u8 {
    let client = ApiClient::new(&args.api_socket);
    let result = match args.action {
        CtlAction::Info => client.info(),
        CtlAction::Pause => client.pause(),
        CtlAction::Resume => client.resume(),
        CtlAction::Snapshot { dir, keep_paused } => client.snapshot(&dir, keep_paused),
        CtlAction::Shutdown => client.shutdown(),
        CtlAction::Update { binary } => return ctl_update(&client, binary.as_deref()),
    };
    match result {
        Ok(v) => {
            print_json(&v);
            EXIT_OK
        }
        Err(e) => {
            report(&e);
            EXIT_ERROR
        }
    }
}

/// Starts a live update and waits until the new process answers with a newer
/// generation (or the old one reports a failure); prints the update report.
fn ctl_update(client: &ApiClient, binary: Option<&std::path::Path>) -> u8 {
    let before = match client.info() {
        Ok(v) => v["generation"].as_u64().unwrap_or(0),
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    if let Err(e) = client.update(binary) {
        report(&e);
        return EXIT_ERROR;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let Ok(info) = client.info() else { continue };
        let last = &info["last_update"];
        let newer = info["generation"].as_u64().unwrap_or(0) > before;
        if newer || last["outcome"].as_str() == Some("failed") {
            print_json(last);
            return if last["outcome"].as_str() == Some("updated") {
                EXIT_OK
            } else {
                EXIT_ERROR
            };
        }
    }
    eprintln!("waterbear: error: the VMM did not report the update within 60 s");
    EXIT_ERROR
}

/// The receiving side of a live update: restore from the hand-over and run; if that
/// fails, execute the previous binary with the same hand-over.
fn resume_update(handoff_fd: i32) -> u8 {
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
fn fall_back(mut handoff: update::Handoff, error: String) -> u8 {
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

fn bench(args: BenchArgs, restores_too: bool) -> u8 {
    use waterbear::bench;
    let sizes: Vec<u64> = match args
        .sizes
        .iter()
        .map(|s| parse_size(s).map(|b| b >> 20))
        .collect()
    {
        Ok(v) => v,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    let dir = match tempfile_dir(&args.work_dir) {
        Ok(d) => d,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    let result = (|| {
        let mut restores = Vec::new();
        for &mib in sizes.iter().filter(|_| restores_too) {
            for copy in [false, true] {
                let r = bench::restore_round(&dir, mib, 1, copy)?;
                eprintln!(
                    "restore {mib} MiB {}: {:.2} ms to vCPUs running",
                    r.mode, r.startup_ms_median
                );
                restores.push(r);
            }
        }
        let small = sizes.first().copied().unwrap_or(128);
        for &n in args.vms.iter().filter(|&&n| n > 1 && restores_too) {
            let r = bench::restore_round(&dir, small, n, false)?;
            eprintln!(
                "restore {n} x {small} MiB: {:.2} ms median",
                r.startup_ms_median
            );
            restores.push(r);
        }
        let mut updates = Vec::new();
        for &mib in &sizes {
            let u = bench::update_round(&dir, mib, args.updates)?;
            eprintln!(
                "live update {mib} MiB: {:.2} ms median blackout",
                u.blackout_ms_median
            );
            updates.push(u);
        }
        Ok::<_, bench::BenchError>((restores, updates))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let (restores, updates) = match result {
        Ok(v) => v,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    let table = bench::markdown(&restores, &updates);
    println!("{table}");
    let json = serde_json::json!({"restore": restores, "live_update": updates});
    let mut outputs = vec![(
        args.json,
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    )];
    outputs.extend(args.markdown.map(|p| (p, table)));
    for (path, text) in outputs {
        if let Err(e) = bench::write(&path, &text) {
            report(&e);
            return EXIT_ERROR;
        }
    }
    EXIT_OK
}

/// A fresh directory under `parent` for one benchmark run.
fn tempfile_dir(parent: &std::path::Path) -> std::io::Result<PathBuf> {
    let dir = parent.join(format!("waterbear-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn reset_options(a: &ResetArgs) -> waterbear::host::reset::ResetOptions {
    waterbear::host::reset::ResetOptions {
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        append: a.append.clone(),
        force: a.force,
        no_kexec: a.no_kexec,
    }
}

fn host(args: HostArgs) -> u8 {
    use waterbear::host::{diagnose, inventory, prepare, recover, reset, restore_all};
    let _ = waterbear::logger::init(LevelFilter::Warn, None);
    let root = args.state_root;
    let self_exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("waterbear"));
    // recover succeeds when its last step did, whatever failed (and escalated) before.
    let judge_last_only = matches!(args.action, HostAction::Recover { .. });
    let prints_table = matches!(args.action, HostAction::Status | HostAction::RestoreAll);
    let result: Result<serde_json::Value, waterbear::host::HostError> = match args.action {
        HostAction::Status => inventory::scan(&root).map(|vms| {
            if !args.json {
                println!(
                    "{:<20} {:<8} {:>8} {:>9}  {:<6} MEMORY",
                    "ID", "STATE", "PID", "MIB", "RESET"
                );
                for v in &vms {
                    println!(
                        "{:<20} {:<8} {:>8} {:>9}  {:<6} {}",
                        v.id,
                        format!("{:?}", v.state).to_lowercase(),
                        v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        v.memory_bytes
                            .map(|b| (b >> 20).to_string())
                            .unwrap_or_else(|| "-".into()),
                        if v.survives_host_reset { "yes" } else { "no" },
                        v.memory
                    );
                }
            }
            serde_json::json!(vms)
        }),
        HostAction::Diagnose { out } => diagnose::diagnose(&root, &out, Vec::new()).map(|f| {
            eprintln!("bundle written to {} ({} findings)", out.display(), f.len());
            serde_json::json!({"bundle": out, "findings": f})
        }),
        HostAction::Reset(a) => {
            reset::reset(&root, &reset_options(&a)).map(|saved| serde_json::json!(saved))
        }
        HostAction::RestoreAll => restore_all::restore_all(&root, &self_exe).map(|r| {
            if !args.json {
                for v in &r {
                    match (&v.error, v.latency_ms) {
                        (None, Some(ms)) => println!(
                            "{:<20} restored in {:.1} ms (pid {}, {:.2} ms in the VMM)",
                            v.id,
                            ms,
                            v.pid.unwrap_or(0),
                            v.startup_ms.unwrap_or(f64::NAN)
                        ),
                        (e, _) => println!(
                            "{:<20} NOT restored: {}",
                            v.id,
                            e.clone().unwrap_or_default()
                        ),
                    }
                }
            }
            serde_json::json!(r)
        }),
        HostAction::Recover {
            reset,
            bundle,
            timeline,
            inject_failure,
        } => {
            let bundle = bundle.unwrap_or_else(|| diagnose::default_out(&root));
            let timeline =
                timeline.unwrap_or_else(|| bundle.with_file_name("recover-timeline.json"));
            if let Some(parent) = timeline.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let opts = recover::RecoverOptions {
                reset: reset_options(&reset),
                bundle,
                timeline,
                inject: inject_failure,
                binary: self_exe,
            };
            recover::recover(&root, &opts).map(|steps| serde_json::json!(steps))
        }
        HostAction::Prepare { device, mount } => prepare::prepare(&device, &mount)
            .map(|root| serde_json::json!({"state_root": root}))
            .map_err(Into::into),
    };
    match result {
        Ok(v) => {
            // status and restore-all print their own table; the rest print JSON.
            if args.json || !prints_table {
                print_json(&v);
            }
            let bad = |x: &serde_json::Value| {
                !x["error"].is_null() || x["outcome"].as_str().is_some_and(|o| o != "ok")
            };
            let failed = match v.as_array() {
                Some(a) if judge_last_only => a.last().is_some_and(bad),
                Some(a) => a.iter().any(bad),
                None => false,
            };
            if failed {
                EXIT_ERROR
            } else {
                EXIT_OK
            }
        }
        Err(e) => {
            report(&e);
            EXIT_ERROR
        }
    }
}

fn main() -> ExitCode {
    waterbear::mark_process_start();
    waterbear::vmm::events::block_stop_signals();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
        Command::Snapshot(SnapshotCommand::Inspect { file }) => inspect(file),
        Command::Ctl(args) => ctl(args),
        Command::Host(args) => host(args),
        Command::Bench(BenchCommand::Restore(args)) => bench(args, true),
        Command::Bench(BenchCommand::Update(args)) => bench(args, false),
        Command::ResumeUpdate { handoff_fd } => resume_update(handoff_fd),
    };
    ExitCode::from(code)
}
