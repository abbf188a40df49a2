//! `ctl`: the client side of the control API.

use std::path::PathBuf;

use clap::Subcommand;
use waterbear::api::ApiClient;

use crate::{print_json, report, EXIT_ERROR, EXIT_OK};

#[derive(clap::Args)]
pub(crate) struct CtlArgs {
    /// The VM's API socket: what `run --api-socket` gave, <state-dir>/api.sock unless
    /// set there.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,

    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand)]
pub(crate) enum CtlAction {
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

pub(crate) fn ctl(args: CtlArgs) -> u8 {
    let client = ApiClient::new(&args.api_socket);
    // Quick requests get a short answer deadline; a snapshot writing memory out and an
    // update keep the client's long default.
    let quick = client.clone().with_timeouts(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(30),
    );
    let result = match args.action {
        CtlAction::Info => quick.info(),
        CtlAction::Pause => quick.pause(),
        CtlAction::Resume => quick.resume(),
        CtlAction::Snapshot { dir, keep_paused } => client.snapshot(&dir, keep_paused),
        CtlAction::Shutdown => quick.shutdown(),
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
pub(crate) fn ctl_update(client: &ApiClient, binary: Option<&std::path::Path>) -> u8 {
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
