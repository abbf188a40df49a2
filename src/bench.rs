//! `waterbear bench`: restore latency and live-update blackout, measured with the
//! built-in test guest by driving this same binary as a user would (separate VMM
//! processes, the control API).
//!
//! Figures are printed as a table, written as JSON, and optionally as a Markdown table
//! for docs/benchmarks.md. Absolute times depend on the host; compare ratios from one
//! run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::api::ApiClient;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("benchmark step failed: {0}")]
    Step(String),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn step(msg: impl Into<String>) -> BenchError {
    BenchError::Step(msg.into())
}

/// One restore measurement.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreSample {
    pub memory_mib: u64,
    pub vms: usize,
    pub mode: &'static str,
    /// From spawning `waterbear restore` to its API answering, per VM (median, max).
    pub wall_ms_median: f64,
    pub wall_ms_max: f64,
    /// From the restoring process's `main` to its vCPUs running, per VM (median, max).
    pub startup_ms_median: f64,
    pub startup_ms_max: f64,
}

/// One live-update measurement.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateSample {
    pub memory_mib: u64,
    pub updates: usize,
    pub blackout_ms_median: f64,
    pub blackout_ms_max: f64,
    /// The guest-observed blackout: the extra delay between two tick lines across each
    /// update, as seen on the console (median, max).
    pub console_gap_ms_median: f64,
    pub console_gap_ms_max: f64,
}

/// A VMM process started by the benchmark; killed if still running when dropped.
struct Vmm {
    child: Child,
    api: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = ApiClient::new(&self.api).shutdown();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn exe() -> Result<PathBuf, BenchError> {
    std::env::current_exe().map_err(|e| step(format!("cannot find this binary: {e}")))
}

fn wait_api(api: &Path, timeout: Duration) -> Result<Value, BenchError> {
    let client = ApiClient::new(api).with_timeouts(Duration::from_secs(1), Duration::from_secs(5));
    let deadline = Instant::now() + timeout;
    loop {
        match client.info() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(step(format!(
                    "VMM at {} never answered: {e}",
                    api.display()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

/// The guest's tick period in the benchmark.
const TICK_MS: f64 = 20.0;

/// When each `tick N` line of a guest's console arrived, read from its stdout.
type TickTimes = std::sync::Arc<std::sync::Mutex<Vec<Instant>>>;

fn record_ticks(out: std::process::ChildStdout) -> TickTimes {
    use std::io::BufRead;
    let times: TickTimes = Default::default();
    let sink = times.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("tick ") {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Instant::now());
            }
        }
    });
    times
}

fn start_vm(dir: &Path, name: &str, memory_mib: u64, memory_file: bool) -> Result<Vmm, BenchError> {
    start_vm_with(dir, name, memory_mib, memory_file, "null").map(|(vm, _)| vm)
}

/// Starts a VM; with `serial` "stdio" its tick lines are timed as they arrive.
fn start_vm_with(
    dir: &Path,
    name: &str,
    memory_mib: u64,
    memory_file: bool,
    serial: &str,
) -> Result<(Vmm, Option<TickTimes>), BenchError> {
    let state = dir.join(name);
    let api = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(exe()?);
    cmd.args(["run", "--serial", serial, "--cmdline", "tick_ms=20"])
        .stdout(if serial == "stdio" {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .arg("--memory")
        .arg(format!("{memory_mib}M"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null());
    if memory_file {
        cmd.arg("--memory-file")
            .arg(dir.join(format!("{name}.mem")));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| step(format!("cannot start a VM: {e}")))?;
    let ticks = child.stdout.take().map(record_ticks);
    let vmm = Vmm { child, api };
    wait_api(&vmm.api, Duration::from_secs(30))?;
    Ok((vmm, ticks))
}

/// Starts a VM, lets it tick, snapshots it paused into `<dir>/<name>.snap` and stops it.
fn saved_vm(dir: &Path, name: &str, memory_mib: u64) -> Result<PathBuf, BenchError> {
    let vm = start_vm(dir, name, memory_mib, true)?;
    std::thread::sleep(Duration::from_millis(200));
    let snap = dir.join(format!("{name}.snap"));
    ApiClient::new(&vm.api)
        .snapshot(&snap, true)
        .map_err(|e| step(format!("snapshot of {name}: {e}")))?;
    drop(vm);
    Ok(snap)
}

fn median_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let median = if v.is_empty() { 0.0 } else { v[v.len() / 2] };
    (median, v.last().copied().unwrap_or(0.0))
}

/// Restores `vms` VMs of `memory_mib` at once, in place or copying, and measures each.
pub fn restore_round(
    dir: &Path,
    memory_mib: u64,
    vms: usize,
    copy: bool,
) -> Result<RestoreSample, BenchError> {
    let snaps: Vec<PathBuf> = (0..vms)
        .map(|i| saved_vm(dir, &format!("r{memory_mib}-{vms}-{i}"), memory_mib))
        .collect::<Result<_, _>>()?;
    let mut running = Vec::new();
    for (i, snap) in snaps.iter().enumerate() {
        let api = dir.join(format!("r{memory_mib}-{vms}-{i}.sock"));
        let mut cmd = Command::new(exe()?);
        cmd.args(["restore", "--serial", "null", "--from"])
            .arg(snap)
            .stdin(Stdio::null());
        if copy {
            cmd.arg("--copy-memory");
        }
        let t0 = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| step(format!("cannot start a restore: {e}")))?;
        running.push((Vmm { child, api }, t0));
    }
    let mut wall = Vec::new();
    let mut startup = Vec::new();
    for (vm, t0) in &running {
        let info = wait_api(&vm.api, Duration::from_secs(60))?;
        wall.push(t0.elapsed().as_secs_f64() * 1000.0);
        startup.push(info["startup_ms"].as_f64().unwrap_or(f64::NAN));
    }
    drop(running);
    for snap in &snaps {
        let _ = std::fs::remove_dir_all(snap);
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().ends_with(".mem") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let (wall_ms_median, wall_ms_max) = median_max(wall);
    let (startup_ms_median, startup_ms_max) = median_max(startup);
    Ok(RestoreSample {
        memory_mib,
        vms,
        mode: if copy { "copied" } else { "in place" },
        wall_ms_median,
        wall_ms_max,
        startup_ms_median,
        startup_ms_max,
    })
}

/// Runs `updates` live updates of one VM and collects the reported blackouts.
pub fn update_round(
    dir: &Path,
    memory_mib: u64,
    updates: usize,
) -> Result<UpdateSample, BenchError> {
    let (vm, ticks) = start_vm_with(dir, &format!("u{memory_mib}"), memory_mib, false, "stdio")?;
    let ticks = ticks.ok_or_else(|| step("no console to time"))?;
    std::thread::sleep(Duration::from_millis(200));
    let client = ApiClient::new(&vm.api);
    let mut blackouts = Vec::new();
    for n in 1..=updates as u64 {
        client
            .update(None)
            .map_err(|e| step(format!("update {n}: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = wait_api(&vm.api, Duration::from_secs(30))?;
            if info["generation"].as_u64() == Some(n) {
                let report = &info["last_update"];
                if report["outcome"] != "updated" {
                    return Err(step(format!("update {n} did not succeed: {report}")));
                }
                blackouts.push(report["blackout_ms"].as_f64().unwrap_or(f64::NAN));
                break;
            }
            if Instant::now() > deadline {
                return Err(step(format!("update {n} never completed")));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    // What the guest's console showed: the longest pauses between tick lines beyond one
    // tick period, one per update.
    let times = ticks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0 - TICK_MS)
        .collect();
    gaps.sort_by(|a, b| b.total_cmp(a));
    gaps.truncate(updates);
    let (blackout_ms_median, blackout_ms_max) = median_max(blackouts);
    let (console_gap_ms_median, console_gap_ms_max) = median_max(gaps);
    Ok(UpdateSample {
        memory_mib,
        updates,
        blackout_ms_median,
        blackout_ms_max,
        console_gap_ms_median,
        console_gap_ms_max,
    })
}

/// The tables as Markdown, for docs/benchmarks.md.
pub fn markdown(restores: &[RestoreSample], updates: &[UpdateSample]) -> String {
    let mut s = String::new();
    if !restores.is_empty() {
        s.push_str("| guest RAM | VMs restored together | memory | restore, spawn to API answering (median / max ms) | restore, main to vCPUs running (median / max ms) |\n|---|---|---|---|---|\n");
        for r in restores {
            s.push_str(&format!(
                "| {} MiB | {} | {} | {:.1} / {:.1} | {:.2} / {:.2} |\n",
                r.memory_mib,
                r.vms,
                r.mode,
                r.wall_ms_median,
                r.wall_ms_max,
                r.startup_ms_median,
                r.startup_ms_max
            ));
        }
    }
    if !updates.is_empty() {
        s.push_str(
            "\n| guest RAM | live updates | blackout, pause to resume (median / max ms) | \
             guest-observed gap between ticks (median / max ms) |\n|---|---|---|---|\n",
        );
        for u in updates {
            s.push_str(&format!(
                "| {} MiB | {} | {:.1} / {:.1} | {:.1} / {:.1} |\n",
                u.memory_mib,
                u.updates,
                u.blackout_ms_median,
                u.blackout_ms_max,
                u.console_gap_ms_median,
                u.console_gap_ms_max
            ));
        }
    }
    s
}

/// Writes `text` to `path`, naming the path on failure.
pub fn write(path: &Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|source| BenchError::Write {
        path: path.into(),
        source,
    })
}
