//! Bringing every saved VM under the state root back, each in its own VMM process,
//! all at once. A VM whose state is corrupt or whose memory did not survive is reported
//! and left as it is; the others come back.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::inventory::{self, VmState};
use super::HostError;
use crate::api::ApiClient;
use crate::vmm::config::SerialMode;
use crate::vmm::saved;

/// How long a restored VMM may take to answer its API.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// The outcome for one VM.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredVm {
    pub id: String,
    pub dir: std::path::PathBuf,
    pub pid: Option<u32>,
    /// From spawning the VMM to its API answering with the vCPUs running.
    pub latency_ms: Option<f64>,
    /// The VMM's own figure: from its `main` to its vCPUs running.
    pub startup_ms: Option<f64>,
    pub error: Option<String>,
}

/// Restores every saved VM under `root` in parallel. `binary` is the waterbear to run.
pub fn restore_all(root: &Path, binary: &Path) -> Result<Vec<RestoredVm>, HostError> {
    let saved: Vec<_> = inventory::scan(root)?
        .into_iter()
        .filter(|v| v.state == VmState::Saved)
        .collect();
    let mut started = Vec::new();
    for vm in &saved {
        // A state that does not read is reported as it is, and the VM left alone.
        let child = match saved::read_snapshot(&vm.dir) {
            Ok(_) => spawn_restore(binary, &vm.dir),
            Err(e) => Err(format!("its saved state is unusable: {e}")),
        };
        started.push((vm, child, Instant::now()));
    }
    let mut results = Vec::new();
    for (vm, child, t0) in started {
        let mut out = RestoredVm {
            id: vm.id.clone(),
            dir: vm.dir.clone(),
            pid: None,
            latency_ms: None,
            startup_ms: None,
            error: None,
        };
        match child {
            Err(e) => out.error = Some(e),
            Ok(mut child) => {
                out.pid = Some(child.id());
                match wait_running(&mut child, vm.api_socket.as_deref(), &vm.dir) {
                    Ok(info) => {
                        out.latency_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
                        out.startup_ms = info["startup_ms"].as_f64();
                    }
                    Err(e) => out.error = Some(e),
                }
            }
        }
        results.push(out);
    }
    Ok(results)
}

/// Starts `waterbear restore --from DIR` detached from this process (own session,
/// output to DIR/vmm.log), so it outlives the command that started it.
fn spawn_restore(binary: &Path, dir: &Path) -> Result<std::process::Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vmm.log"))
        .map_err(|e| format!("cannot open {}: {e}", dir.join("vmm.log").display()))?;
    let err_log = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(binary);
    cmd.arg("restore")
        .arg("--from")
        .arg(dir)
        .arg("--log-level")
        .arg("info");
    // A VM saved with its console on a terminal gets it in a file now: the terminal
    // went away with the old kernel.
    if let Ok(snap) = saved::read_snapshot(dir) {
        if snap.config.serial == SerialMode::Stdio {
            cmd.arg("--serial")
                .arg(format!("file={}", dir.join("console.log").display()));
        }
    }
    cmd.stdin(Stdio::null()).stdout(log).stderr(err_log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))
}

fn wait_running(
    child: &mut std::process::Child,
    api: Option<&Path>,
    dir: &Path,
) -> Result<serde_json::Value, String> {
    let api = api.ok_or("the saved VM has no API socket")?;
    let client = ApiClient::new(api).with_timeouts(Duration::from_secs(1), Duration::from_secs(5));
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(match last_error(&dir.join("vmm.log")) {
                Some(why) => format!("{why} (its restore exited with {status}; more in vmm.log)"),
                None => {
                    format!("its restore exited with {status}; see vmm.log in its state directory")
                }
            });
        }
        if let Ok(info) = client.info() {
            if info["pid"].as_u64() == Some(u64::from(child.id())) {
                return Ok(info);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no answer on {} within {RESTORE_TIMEOUT:?}",
                api.display()
            ));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// The last error the VMM reported in its log (`waterbear: error: ...` and the causes
/// under it), to show with the VM's failure.
fn last_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.starts_with("waterbear: error: "))?;
    let mut why = lines[start]["waterbear: error: ".len()..].to_string();
    for cause in lines[start + 1..]
        .iter()
        .take_while(|l| l.starts_with("  caused by: "))
    {
        why.push_str(": ");
        why.push_str(&cause["  caused by: ".len()..]);
    }
    Some(why)
}
