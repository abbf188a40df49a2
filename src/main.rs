//! The `waterbear` command line. Parsing and exit codes only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use log::LevelFilter;

mod cli;

use cli::bench::{bench, BenchCommand};
use cli::ctl::{ctl, CtlArgs};
use cli::host::{host, HostArgs};
use cli::vm::{inspect, restore, resume_update, run, RestoreArgs, RunArgs, SnapshotCommand};

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

#[derive(clap::Args)]
struct LogArgs {
    /// Log level: error, warn, info or debug.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: LevelFilter,

    /// Write the log to this file (appending) instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
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

fn init_logging(log: &LogArgs) -> Result<(), u8> {
    waterbear::logger::init(log.log_level, log.log_file.as_deref()).map_err(|e| {
        report(&e);
        EXIT_ERROR
    })
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialise")
    );
}

fn main() -> ExitCode {
    waterbear::mark_process_start();
    waterbear::vmm::events::block_stop_signals();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
        Command::Snapshot(SnapshotCommand::Inspect { file }) => {
            quiet_on_closed_pipe();
            inspect(file)
        }
        Command::Ctl(args) => {
            quiet_on_closed_pipe();
            ctl(args)
        }
        Command::Host(args) => {
            quiet_on_closed_pipe();
            host(args)
        }
        Command::Bench(BenchCommand::Restore(args)) => bench(args, true),
        Command::Bench(BenchCommand::Update(args)) => bench(args, false),
        Command::ResumeUpdate { handoff_fd } => resume_update(handoff_fd),
    };
    ExitCode::from(code)
}

/// For commands that only print (never a VMM, whose guest must not die with its
/// console's reader): a closed stdout (`| head`) ends the command quietly, as for other
/// command-line tools, instead of a panic in `println!`.
fn quiet_on_closed_pipe() {
    // SAFETY: restoring the default disposition of SIGPIPE has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
