//! Phase 2 of the recovery workflow: one bundle with what a person needs to find the
//! root cause — each VMM's log, configuration and state summary, the host kernel log,
//! process states, memory and pressure figures, KVM statistics — and `summary.json`
//! listing the findings to look at first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use super::inventory::{self, VmState};
use super::HostError;
use crate::api::ApiClient;

/// Kernel log patterns that point at a host problem, with what they mean.
const KERNEL_PATTERNS: &[(&str, &str)] = &[
    ("blocked for more than", "hung task"),
    ("soft lockup", "soft lockup"),
    ("hard LOCKUP", "hard lockup"),
    ("rcu_sched self-detected stall", "RCU stall"),
    ("Machine check", "machine-check error"),
    ("mce:", "machine-check error"),
    ("Out of memory", "out-of-memory kill"),
    ("BUG:", "kernel bug"),
    ("Oops", "kernel oops"),
    ("WARNING:", "kernel warning"),
];

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: &'static str,
    pub what: String,
    pub detail: String,
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), HostError> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|source| HostError::Write { path, source })
}

/// The kernel log: /dev/kmsg read without blocking, or `dmesg` when that fails.
fn kernel_log() -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    {
        let mut out = String::new();
        let mut buf = vec![0u8; 8192];
        // Each read returns one record; EAGAIN ends the log.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            let rec = String::from_utf8_lossy(&buf[..n]);
            out.push_str(rec.split_once(';').map(|(_, m)| m).unwrap_or(&rec));
        }
        if !out.is_empty() {
            return out;
        }
    }
    std::process::Command::new("dmesg")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// KVM's statistics from debugfs, when mounted.
fn kvm_stats() -> Value {
    let dir = Path::new("/sys/kernel/debug/kvm");
    let mut stats = serde_json::Map::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_file() {
            let v = std::fs::read_to_string(e.path()).unwrap_or_default();
            stats.insert(e.file_name().to_string_lossy().into(), json!(v.trim()));
        }
    }
    if stats.is_empty() {
        json!({"note": "debugfs KVM statistics are not available (mount debugfs on /sys/kernel/debug)"})
    } else {
        Value::Object(stats)
    }
}

/// Writes the bundle into `out` and returns the findings.
/// `known` are findings the caller already has (a failed phase 1 step), listed first.
pub fn diagnose(root: &Path, out: &Path, known: Vec<Finding>) -> Result<Vec<Finding>, HostError> {
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| HostError::Write {
            path: p.into(),
            source,
        })
    };
    mkdir(out)?;
    let mut findings = known;
    let vms = inventory::scan(root)?;
    let vm_dir = out.join("vms");
    let mut vm_summaries = Vec::new();
    for vm in &vms {
        let d = vm_dir.join(&vm.id);
        mkdir(&d)?;
        for name in ["config.json", "vm.json", "vmm.log", "console.log"] {
            let _ = std::fs::copy(vm.dir.join(name), d.join(name));
        }
        let mut summary =
            json!({"id": vm.id, "state": vm.state, "pid": vm.pid, "memory": vm.memory});
        if vm.state == VmState::Running {
            let api = vm.api_socket.clone().unwrap_or_default();
            let client =
                ApiClient::new(&api).with_timeouts(Duration::from_secs(2), Duration::from_secs(2));
            match client.info() {
                Ok(info) => {
                    write(
                        &d,
                        "info.json",
                        &serde_json::to_string_pretty(&info).unwrap_or_default(),
                    )?;
                    if info["last_update"]["outcome"] == "fallback"
                        || info["last_update"]["outcome"] == "failed"
                    {
                        findings.push(Finding {
                            severity: "warning",
                            what: format!("VM {}: its last live update did not succeed", vm.id),
                            detail: info["last_update"].to_string(),
                        });
                    }
                    summary["api"] = json!("answers");
                }
                Err(e) => {
                    findings.push(Finding {
                        severity: "critical",
                        what: format!("VMM of VM {} does not answer its API", vm.id),
                        detail: e.to_string(),
                    });
                    summary["api"] = json!(e.to_string());
                }
            }
            if let Some(pid) = vm.pid {
                write(
                    &d,
                    "process-status.txt",
                    &read(&format!("/proc/{pid}/status")),
                )?;
                write(
                    &d,
                    "process-stack.txt",
                    &read(&format!("/proc/{pid}/stack")),
                )?;
                let state = read(&format!("/proc/{pid}/stat"));
                if let Some(s) = state
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next())
                {
                    if s == "D" || s == "Z" {
                        findings.push(Finding {
                            severity: "critical",
                            what: format!("VMM of VM {} is in process state {s}", vm.id),
                            detail: state.trim().into(),
                        });
                    }
                }
            }
        }
        if vm.dir.join("vm.state").exists() {
            if let Ok(v) = crate::snapshot::inspect::inspect(&vm.dir.join("vm.state")) {
                write(
                    &d,
                    "saved-state.json",
                    &serde_json::to_string_pretty(&v).unwrap_or_default(),
                )?;
            }
        }
        vm_summaries.push(summary);
    }

    let host = out.join("host");
    mkdir(&host)?;
    let klog = kernel_log();
    write(&host, "kernel.log", &klog)?;
    for (pattern, what) in KERNEL_PATTERNS {
        let hits: Vec<&str> = klog.lines().filter(|l| l.contains(pattern)).collect();
        if let Some(first) = hits.first() {
            findings.push(Finding {
                severity: "warning",
                what: format!("kernel log: {what} ({} lines)", hits.len()),
                detail: first.trim().into(),
            });
        }
    }
    for (name, path) in [
        ("meminfo", "/proc/meminfo"),
        ("loadavg", "/proc/loadavg"),
        ("vmstat", "/proc/vmstat"),
        ("uptime", "/proc/uptime"),
    ] {
        write(&host, name, &read(path))?;
    }
    let mut pressure = serde_json::Map::new();
    for res in ["cpu", "memory", "io"] {
        let text = read(&format!("/proc/pressure/{res}"));
        let avg10 = text
            .lines()
            .find(|l| l.starts_with("some"))
            .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("avg10=")))
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = avg10.filter(|v| *v > 20.0) {
            findings.push(Finding {
                severity: "warning",
                what: format!("{res} pressure is high"),
                detail: format!("some avg10={v}"),
            });
        }
        pressure.insert(res.into(), json!(text.trim()));
    }
    write(
        &host,
        "kvm-stats.json",
        &serde_json::to_string_pretty(&kvm_stats()).unwrap_or_default(),
    )?;

    let summary = json!({
        "created_unix_ms": crate::vmm::saved::unix_ms(),
        "state_root": root,
        "vms": vm_summaries,
        "pressure": pressure,
        "findings": findings,
    });
    write(
        out,
        "summary.json",
        &serde_json::to_string_pretty(&summary).unwrap_or_default(),
    )?;
    Ok(findings)
}

/// The default bundle directory: beside the state root, named by time.
pub fn default_out(root: &Path) -> PathBuf {
    let base = root.parent().unwrap_or(root).join("diagnostics");
    base.join(format!("bundle-{}", crate::vmm::saved::unix_ms()))
}
