//! `host`: commands over every VM under the state root (the recovery workflow).

use std::path::PathBuf;

use clap::Subcommand;
use log::LevelFilter;
use waterbear::vmm::config;

use crate::{print_json, report, EXIT_ERROR, EXIT_OK};

#[derive(clap::Args)]
pub(crate) struct HostArgs {
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
pub(crate) struct ResetArgs {
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
pub(crate) enum HostAction {
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

pub(crate) fn reset_options(a: &ResetArgs) -> waterbear::host::reset::ResetOptions {
    waterbear::host::reset::ResetOptions {
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        append: a.append.clone(),
        force: a.force,
        no_kexec: a.no_kexec,
    }
}

pub(crate) fn host(args: HostArgs) -> u8 {
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
