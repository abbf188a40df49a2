//! The escalation: phase 1 live-updates every VMM and checks it is healthy; if one is
//! not, phase 2 collects the diagnostics bundle and phase 3 resets the host. Every
//! step goes to a JSON timeline with its start, duration and outcome.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::inventory::{self, VmState};
use super::reset::{self, ResetOptions};
use super::{diagnose, restore_all, HostError};
use crate::api::ApiClient;

/// A phase that tests can make fail on purpose (`--inject-failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InjectedFailure {
    /// The health check after the live update fails for the first VM.
    Phase1,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub phase: u8,
    pub step: String,
    pub start_unix_ms: u64,
    pub duration_ms: f64,
    pub outcome: String,
}

pub struct RecoverOptions {
    pub reset: ResetOptions,
    pub bundle: PathBuf,
    pub timeline: PathBuf,
    pub inject: Option<InjectedFailure>,
    /// With `reset.no_kexec`, restore the VMs right after saving them (a rehearsal of
    /// phase 3 without the new kernel).
    pub binary: PathBuf,
}

struct Timeline {
    steps: Vec<Step>,
    path: PathBuf,
}

impl Timeline {
    fn record<T>(
        &mut self,
        phase: u8,
        step: &str,
        f: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        let start_unix_ms = crate::vmm::saved::unix_ms();
        let t = Instant::now();
        let r = f();
        self.steps.push(Step {
            phase,
            step: step.into(),
            start_unix_ms,
            duration_ms: t.elapsed().as_secs_f64() * 1000.0,
            outcome: match &r {
                Ok(_) => "ok".into(),
                Err(e) => format!("failed: {e}"),
            },
        });
        log::info!(
            "recover: phase {phase} {step}: {}",
            self.steps.last().map(|s| s.outcome.as_str()).unwrap_or("")
        );
        // Written after every step, so a kexec or a crash leaves the timeline so far.
        let _ = crate::snapshot::write_atomic(
            &self.path,
            serde_json::to_string_pretty(&self.steps)
                .unwrap_or_default()
                .as_bytes(),
        );
        r
    }
}

fn update_and_check(api: &Path, inject: bool) -> Result<(), String> {
    // Bounded: an unanswering VMM is a failed health check, not a hung recovery.
    let client = ApiClient::new(api).with_timeouts(Duration::from_secs(2), Duration::from_secs(30));
    let before = client.info().map_err(|e| e.to_string())?;
    let generation = before["generation"].as_u64().unwrap_or(0);
    client.update(None).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(info) = client.info() {
            if info["generation"].as_u64().unwrap_or(0) > generation
                || info["last_update"]["outcome"] == "failed"
            {
                if info["last_update"]["outcome"] != "updated" {
                    return Err(format!("update outcome {}", info["last_update"]));
                }
                if info["state"] != "running" {
                    return Err(format!("VM is {} after the update", info["state"]));
                }
                if inject {
                    return Err(
                        "health check failed (failure injected with --inject-failure phase1)"
                            .into(),
                    );
                }
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("the VMM did not come back within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the escalation; returns the timeline.
pub fn recover(root: &Path, opts: &RecoverOptions) -> Result<Vec<Step>, HostError> {
    let mut tl = Timeline {
        steps: Vec::new(),
        path: opts.timeline.clone(),
    };
    let vms: Vec<_> = inventory::scan(root)?
        .into_iter()
        .filter(|v| v.state == VmState::Running)
        .collect();
    let mut failures = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        let inject = opts.inject == Some(InjectedFailure::Phase1) && i == 0;
        let api = vm.api_socket.clone().unwrap_or_default();
        let r = tl.record(
            1,
            &format!("live update and health check of {}", vm.id),
            || update_and_check(&api, inject),
        );
        if let Err(detail) = r {
            failures.push(diagnose::Finding {
                severity: "critical",
                what: format!("phase 1: VM {} is not healthy after its live update", vm.id),
                detail,
            });
        }
    }
    if failures.is_empty() {
        return Ok(tl.steps);
    }
    let bundle = opts.bundle.clone();
    let _ = tl.record(
        2,
        &format!("diagnostics bundle in {}", bundle.display()),
        || {
            let findings =
                diagnose::diagnose(root, &bundle, failures).map_err(|e| e.to_string())?;
            Ok(findings.len())
        },
    );
    // Phase 3 in steps, each on the timeline before the next starts: the kexec does
    // not return, so the timeline must already say it began.
    let reset_opts = opts.reset.clone();
    if !reset_opts.no_kexec {
        let loaded = tl.record(3, "load the next kernel", || {
            let kernel = reset_opts
                .kernel
                .as_deref()
                .ok_or("phase 3 needs --kernel")?;
            super::kexec::load(kernel, reset_opts.initrd.as_deref(), &reset_opts.append)
                .map_err(|e| e.to_string())
        });
        if loaded.is_err() {
            return Ok(tl.steps);
        }
    }
    let saved = tl.record(3, "save every VM", || {
        let saved = reset::save_all(root, reset_opts.force).map_err(|e| e.to_string())?;
        match saved.iter().find(|s| s.error.is_some()) {
            Some(bad) if !reset_opts.force => Err(format!(
                "VM {}: {}",
                bad.id,
                bad.error.clone().unwrap_or_default()
            )),
            _ => Ok(()),
        }
    });
    if saved.is_ok() && !reset_opts.no_kexec {
        let _ = tl.record(
            3,
            "kexec into the next kernel (the timeline ends here)",
            || Ok(()),
        );
        let err = super::kexec::reboot_into_loaded();
        let _ = tl.record(3, "kexec into the next kernel", || {
            Err::<(), _>(err.to_string())
        });
        return Ok(tl.steps);
    }
    if saved.is_ok() && opts.reset.no_kexec {
        let _ = tl.record(3, "restore every VM (no kexec: rehearsal)", || {
            let r = restore_all::restore_all(root, &opts.binary).map_err(|e| e.to_string())?;
            match r.iter().find(|v| v.error.is_some()) {
                Some(bad) => Err(format!(
                    "VM {}: {}",
                    bad.id,
                    bad.error.clone().unwrap_or_default()
                )),
                None => Ok(()),
            }
        });
    }
    Ok(tl.steps)
}
