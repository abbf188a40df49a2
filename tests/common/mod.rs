//! Helpers shared by the integration tests: running the waterbear binary and deciding,
//! loudly, when a test cannot run on this machine.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn waterbear() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_waterbear"))
}

/// Returns a reason when `/dev/kvm` cannot be used here; the caller prints it and skips.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened ({e})")),
    }
}

/// Skips the calling test with a visible reason when KVM is not usable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Some(reason) = common::kvm_unavailable() {
            eprintln!("SKIPPED {}: {reason}", module_path!());
            return;
        }
    };
}

/// Runs `waterbear run` with the given arguments, stdin closed, and a timeout.
pub fn run_vm(args: &[&str], timeout_secs: u64) -> Output {
    Command::new("timeout")
        .arg(timeout_secs.to_string())
        .arg(waterbear())
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run timeout + waterbear")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every file and directory under `dir`, for "nothing was left behind" checks.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            out.push(e.path());
            if e.path().is_dir() {
                out.extend(tree(&e.path()));
            }
        }
    }
    out.sort();
    out
}

/// The "tick N sum S ok" lines of the built-in guest, as (N, ok).
pub fn ticks(console: &str) -> Vec<(u64, bool)> {
    // Only whole lines: the console file may be read while a line is half written.
    let complete = console.rfind('\n').map_or("", |end| &console[..=end]);
    complete
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let kind = w.next()?;
            if kind != "tick" && kind != "done" {
                return None;
            }
            let n = w.next()?.parse().ok()?;
            let ok = l.trim_end().ends_with(" ok");
            Some((n, ok))
        })
        .collect()
}

// ---- Helpers for tests that drive running VMMs (snapshot, restore, live update). ----

use std::ffi::OsStr;
use std::fs::File;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// A temporary directory on /dev/shm when it exists (memory files want tmpfs), else the
/// default temporary directory.
pub fn shm_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("wb-").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("a temporary directory")
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The console file's text, empty while it does not exist.
pub fn read_console(path: &Path) -> String {
    std::fs::read(path).map(|b| text(&b)).unwrap_or_default()
}

/// The highest tick number in `console`, 0 if none.
pub fn last_tick(console: &str) -> u64 {
    ticks(console).iter().map(|t| t.0).max().unwrap_or(0)
}

/// Waits until the console at `path` shows tick `n` (or a later one) and returns its text.
pub fn wait_for_tick(path: &Path, n: u64, timeout: Duration) -> String {
    let mut console = String::new();
    wait_until(&format!("tick {n} in {}", path.display()), timeout, || {
        console = read_console(path);
        last_tick(&console) >= n
    });
    console
}

/// How many times the built-in guest's boot banner appears (one per boot).
pub fn banners(console: &str) -> usize {
    console.matches("waterbear test guest:").count()
}

/// Checks that the tick lines in `console` count up by exactly one each, all with "ok",
/// and returns their numbers.
pub fn assert_consecutive_ok_ticks(console: &str) -> Vec<u64> {
    let t = ticks(console);
    for w in t.windows(2) {
        assert_eq!(
            w[1].0,
            w[0].0 + 1,
            "tick {} followed by tick {}: the counter did not continue by one\n{console}",
            w[0].0,
            w[1].0
        );
    }
    if let Some(bad) = t.iter().find(|x| !x.1) {
        panic!(
            "tick {} does not end in \"ok\" (memory checksum)\n{console}",
            bad.0
        );
    }
    t.iter().map(|x| x.0).collect()
}

/// Runs `waterbear ctl --api-socket API ARGS...` (bounded by `timeout 90`).
pub fn ctl(api: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("90")
        .arg(waterbear())
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run timeout + waterbear ctl")
}

/// Runs `ctl ARGS`, asserts it exits 0 and returns its JSON output.
pub fn ctl_ok(api: &Path, args: &[&str]) -> serde_json::Value {
    let out = ctl(api, args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "waterbear ctl {args:?} failed: stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ctl {args:?} printed no JSON ({e}): {}", text(&out.stdout)))
}

/// A waterbear process started by a test (a `run` or a `restore`). Its stdout and
/// stderr go to files beside its console; it is killed and reaped on drop if it is
/// still running, so a failing test leaves no VM behind.
pub struct VmProcess {
    child: Child,
    pub api: PathBuf,
    pub console: PathBuf,
    pub stderr: PathBuf,
    exited: Option<ExitStatus>,
}

impl VmProcess {
    /// Starts `waterbear ARGS...` with extra environment `envs`. `console` is where the
    /// caller pointed the serial port; `api` the API socket it configured. Output files
    /// are named after `label` in `dir`.
    pub fn spawn<S: AsRef<OsStr>>(
        dir: &Path,
        label: &str,
        args: &[S],
        envs: &[(&str, &str)],
        api: &Path,
        console: &Path,
    ) -> Self {
        let stdout = dir.join(format!("{label}.stdout"));
        let stderr = dir.join(format!("{label}.stderr"));
        let child = Command::new(waterbear())
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn waterbear");
        VmProcess {
            child,
            api: api.into(),
            console: console.into(),
            stderr,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_text(&self) -> String {
        read_console(&self.stderr)
    }

    /// The exit status if the process has ended.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Waits until `ctl info` answers (the VM is up and serving its API); panics with
    /// the process's stderr if it exits first.
    pub fn wait_api(&mut self, timeout: Duration) -> serde_json::Value {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "waterbear exited ({status}) before its API answered: {}",
                    self.stderr_text()
                );
            }
            if self.api.exists() {
                let out = ctl(&self.api, &["info"]);
                if out.status.success() {
                    return serde_json::from_slice(&out.stdout).expect("info is JSON");
                }
            }
            assert!(
                Instant::now() < end,
                "the API at {} did not answer within {timeout:?}: {}",
                self.api.display(),
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the guest prints tick `n` or later; panics with stderr if the process
    /// exits first. Returns the console text.
    pub fn wait_tick(&mut self, n: u64, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let console = read_console(&self.console);
            if last_tick(&console) >= n {
                return console;
            }
            if let Some(status) = self.try_exit() {
                panic!(
                    "waterbear exited ({status}) before tick {n}: stderr {}\nconsole {console}",
                    self.stderr_text()
                );
            }
            assert!(
                Instant::now() < end,
                "no tick {n} within {timeout:?} (last {}): stderr {}\nconsole {console}",
                last_tick(&console),
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit; kills it and panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "waterbear did not exit within {timeout:?}: {}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ctl shutdown`, then waits for exit status 0.
    pub fn shutdown(&mut self) {
        let out = ctl(&self.api, &["shutdown"]);
        assert!(
            out.status.success(),
            "ctl shutdown failed: {} / VMM stderr {}",
            text(&out.stderr),
            self.stderr_text()
        );
        let status = self.wait_exit(Duration::from_secs(20));
        assert_eq!(
            status.code(),
            Some(0),
            "the VMM did not exit 0 after shutdown: {}",
            self.stderr_text()
        );
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Arguments for `waterbear run` of the built-in guest with everything under `dir`:
/// state directory `dir/state`, API socket `dir/api.sock`, console `dir/console`,
/// 32 MiB of RAM, ticking every 50 ms. `extra` is appended (a memory backend, --cpus).
pub fn builtin_run_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--api-socket".into(),
        dir.join("api.sock").display().to_string(),
        "--serial".into(),
        format!("file={}", dir.join("console").display()),
        "--cmdline".into(),
        "tick_ms=50".into(),
    ];
    if !extra.contains(&"--memory") {
        args.extend(["--memory".into(), "32M".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts the built-in guest as `builtin_run_args` describes, with extra environment.
pub fn start_builtin_vm(dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> VmProcess {
    VmProcess::spawn(
        dir,
        "run",
        &builtin_run_args(dir, extra),
        envs,
        &dir.join("api.sock"),
        &dir.join("console"),
    )
}

/// Every file under `dir` with its bytes (None for what cannot be read: directories,
/// sockets), for "nothing on disk changed" checks.
pub fn tree_with_bytes(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    tree(dir)
        .into_iter()
        .map(|p| {
            let bytes = if p.is_file() {
                std::fs::read(&p).ok()
            } else {
                None
            };
            (p, bytes)
        })
        .collect()
}

// ---- Helpers for tests with virtio devices: skipping loudly, private network
// ---- namespaces with their own taps, a process's open files.

/// Writes `SKIPPED: <reason>` straight to stderr (past the test harness's output
/// capture), in one write so that the line stays whole.
pub fn skip(reason: &str) {
    use std::io::Write;
    let line = format!("SKIPPED: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Why taps in a private network namespace cannot be made here, if they cannot: creating
/// the namespace and its taps needs root, `/dev/net/tun` and the `ip` command.
pub fn netns_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (private network namespaces and taps need it)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun does not exist".into());
    }
    let ip_found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join("ip").is_file()))
        .unwrap_or(false);
    if !ip_found {
        return Some("the `ip` command (iproute2) is not installed".into());
    }
    None
}

/// Runs `f` on a new thread that first moves into a new, empty network namespace
/// (`unshare(CLONE_NEWNET)` moves only the calling thread; the processes it starts
/// inherit the namespace). Taps made there never touch the host's interfaces and vanish
/// with the namespace once the thread and its processes are gone, whatever happens.
/// `Err` says why there is no such namespace; a panic in `f` is passed on.
pub fn in_private_netns<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if let Some(reason) = netns_unavailable() {
        return Err(reason);
    }
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare only takes flags; CLONE_NEWNET moves just this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("unshare(CLONE_NEWNET) failed: {e}"));
        }
        let ours = std::fs::read_link("/proc/thread-self/ns/net").map_err(|e| e.to_string())?;
        let host = std::fs::read_link("/proc/self/ns/net").map_err(|e| e.to_string())?;
        if ours == host {
            return Err("the thread is still in the process's network namespace".into());
        }
        Ok(f())
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs `ip ARGS...` (in the calling thread's network namespace) and panics unless it
/// succeeds.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Creates the persistent tap `name` in the calling thread's network namespace, which
/// must be a private one (see [`in_private_netns`]).
pub fn add_tap(name: &str) {
    let ours = std::fs::read_link("/proc/thread-self/ns/net").expect("thread netns");
    let host = std::fs::read_link("/proc/self/ns/net").expect("process netns");
    assert_ne!(
        ours, host,
        "refusing to create a tap in the host's namespace"
    );
    ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
}

/// What each open descriptor of process `pid` points at (`/proc/PID/fd/*`).
pub fn open_files(pid: u32) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect();
    out.sort();
    out
}

/// Runs `waterbear restore --from FROM EXTRA...` with its output in `logs`; returns
/// its exit code and stderr. A restore that is still running after 20 s was accepted:
/// it is killed and the test fails.
pub fn run_restore(logs: &Path, from: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let err_path = logs.join(format!("restore-{}.stderr", std::process::id()));
    let mut child = Command::new(waterbear())
        .arg("restore")
        .arg("--from")
        .arg(from)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "restore --from {} {extra:?} was accepted and ran: {}",
                from.display(),
                read_console(&err_path)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), read_console(&err_path))
}

/// Checks the whole console of a built-in guest that went through restores or updates:
/// one boot banner, and tick lines consecutive and all ok. `what` says what would have
/// rebooted it.
pub fn assert_one_boot_with_ok_ticks(console: &Path, what: &str) {
    let all = read_console(console);
    assert_eq!(banners(&all), 1, "{what}:\n{all}");
    assert_consecutive_ok_ticks(&all);
}
