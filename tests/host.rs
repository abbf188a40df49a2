//! KVM tests of the host commands with the built-in guest: status, reset without the
//! kexec (the save half of phase 3), restore-all, diagnose and the recover escalation.
//! The kexec itself runs in the nested test host (tools/testhost, scenario host-reset).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    assert_consecutive_ok_ticks, banners, builtin_run_args, ctl, read_console, text, wait_for_tick,
    VmProcess,
};

/// Runs `waterbear host --state-root ROOT ARGS...`.
fn host(root: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("120")
        .arg(common::waterbear())
        .arg("host")
        .arg("--state-root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run waterbear host")
}

/// Shuts down, at the end of a test, VMs started by `host restore-all` (they are not
/// this test's children).
struct Restored(Vec<PathBuf>);

impl Drop for Restored {
    fn drop(&mut self) {
        for api in &self.0 {
            let _ = ctl(api, &["shutdown"]);
        }
    }
}

/// Two built-in guests, `a` and `b`, under `<dir>/vms`, memory files on tmpfs.
struct Pair {
    dir: tempfile::TempDir,
    vms: Vec<VmProcess>,
}

impl Pair {
    fn start() -> Self {
        let dir = common::shm_tempdir();
        std::fs::create_dir(dir.path().join("vms")).unwrap();
        let mut vms = Vec::new();
        for id in ["a", "b"] {
            let d = dir.path().join(id);
            std::fs::create_dir(&d).unwrap();
            let state = dir.path().join("vms").join(id);
            let mem = d.join("guest.mem");
            let mut args =
                builtin_run_args(&d, &["--memory-file", mem.to_str().unwrap(), "--id", id]);
            let pos = args.iter().position(|a| a == "--state-dir").unwrap();
            args[pos + 1] = state.display().to_string();
            let mut vm = VmProcess::spawn(
                &d,
                "run",
                &args,
                &[],
                &d.join("api.sock"),
                &d.join("console"),
            );
            vm.wait_tick(3, Duration::from_secs(30));
            vms.push(vm);
        }
        Pair { dir, vms }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("vms")
    }

    fn console(&self, id: &str) -> PathBuf {
        self.dir.path().join(id).join("console")
    }

    fn api(&self, id: &str) -> PathBuf {
        self.dir.path().join(id).join("api.sock")
    }
}

fn status(root: &Path) -> Vec<serde_json::Value> {
    let out = host(root, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("status --json")
}

#[test]
fn host_status_lists_running_vms_with_pid_and_reset_survival() {
    require_kvm!();
    let pair = Pair::start();
    let vms = status(&pair.root());
    assert_eq!(vms.len(), 2, "{vms:?}");
    for (entry, vm) in vms.iter().zip(&pair.vms) {
        assert_eq!(entry["state"], "running");
        assert_eq!(entry["pid"].as_u64(), Some(u64::from(vm.pid())));
        assert_eq!(entry["survives_host_reset"], false, "tmpfs is not DAX");
    }
}

#[test]
fn host_reset_refuses_vms_whose_memory_would_not_survive_and_leaves_them_running() {
    require_kvm!();
    let pair = Pair::start();
    let before = common::last_tick(&read_console(&pair.console("a")));
    let out = host(&pair.root(), &["reset", "--no-kexec"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("a (") && err.contains("b (") && err.contains("--force"),
        "{err}"
    );
    wait_for_tick(&pair.console("a"), before + 3, Duration::from_secs(30));
    assert!(status(&pair.root()).iter().all(|v| v["state"] == "running"));
}

#[test]
fn host_reset_then_restore_all_brings_every_vm_back_where_it_stopped() {
    require_kvm!();
    let mut pair = Pair::start();
    let out = host(&pair.root(), &["reset", "--no-kexec", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for vm in &mut pair.vms {
        assert_eq!(vm.wait_exit(Duration::from_secs(20)).code(), Some(0));
    }
    assert!(status(&pair.root()).iter().all(|v| v["state"] == "saved"));
    let last: Vec<u64> = ["a", "b"]
        .iter()
        .map(|id| common::last_tick(&read_console(&pair.console(id))))
        .collect();

    let out = host(&pair.root(), &["restore-all"]);
    let _cleanup = Restored(vec![pair.api("a"), pair.api("b")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("restored in"),
        "{}",
        text(&out.stdout)
    );
    for (id, last) in ["a", "b"].iter().zip(last) {
        let console = wait_for_tick(&pair.console(id), last + 5, Duration::from_secs(30));
        assert_eq!(banners(&console), 1, "VM {id} rebooted:\n{console}");
        assert_consecutive_ok_ticks(&console);
    }
    assert!(status(&pair.root()).iter().all(|v| v["state"] == "running"));
}

#[test]
fn restore_all_reports_a_corrupt_vm_and_restores_the_others() {
    require_kvm!();
    let mut pair = Pair::start();
    let out = host(&pair.root(), &["reset", "--no-kexec", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for vm in &mut pair.vms {
        vm.wait_exit(Duration::from_secs(20));
    }
    let state_b = pair.root().join("b").join("vm.state");
    let mut bytes = std::fs::read(&state_b).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&state_b, &bytes).unwrap();
    let b_before = common::tree_with_bytes(&pair.root().join("b"));

    let out = host(&pair.root(), &["restore-all"]);
    let _cleanup = Restored(vec![pair.api("a"), pair.api("b")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("b") && stdout.contains("NOT restored"),
        "{stdout}"
    );
    let last_a = common::last_tick(&read_console(&pair.console("a")));
    wait_for_tick(&pair.console("a"), last_a + 3, Duration::from_secs(30));
    // b's directory only gained the restore attempt's log.
    let b_after: Vec<_> = common::tree_with_bytes(&pair.root().join("b"))
        .into_iter()
        .filter(|(p, _)| p.file_name().is_some_and(|n| n != "vmm.log"))
        .collect();
    let b_before: Vec<_> = b_before
        .into_iter()
        .filter(|(p, _)| p.file_name().is_some_and(|n| n != "vmm.log"))
        .collect();
    assert_eq!(b_after, b_before, "the corrupt VM's files changed");
}

#[test]
fn recover_escalates_through_diagnose_to_reset_when_phase1_fails() {
    require_kvm!();
    let mut pair = Pair::start();
    let bundle = pair.dir.path().join("bundle");
    let timeline = pair.dir.path().join("timeline.json");
    let out = host(
        &pair.root(),
        &[
            "recover",
            "--no-kexec",
            "--force",
            "--inject-failure",
            "phase1",
            "--bundle",
            bundle.to_str().unwrap(),
            "--timeline",
            timeline.to_str().unwrap(),
        ],
    );
    let _cleanup = Restored(vec![pair.api("a"), pair.api("b")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for vm in &mut pair.vms {
        vm.wait_exit(Duration::from_secs(20));
    }

    let steps: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&timeline).unwrap()).unwrap();
    let phases: Vec<u64> = steps.iter().map(|s| s["phase"].as_u64().unwrap()).collect();
    assert_eq!(phases, vec![1, 1, 2, 3, 3], "{steps:?}");
    assert!(
        steps[0]["outcome"].as_str().unwrap().contains("injected"),
        "{steps:?}"
    );
    assert!(steps
        .iter()
        .all(|s| s["duration_ms"].as_f64().is_some() && s["start_unix_ms"].as_u64().is_some()));
    assert!(steps[2..].iter().all(|s| s["outcome"] == "ok"), "{steps:?}");

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("summary.json")).unwrap()).unwrap();
    let first = &summary["findings"][0];
    assert_eq!(first["severity"], "critical");
    assert!(
        first["what"].as_str().unwrap().contains("phase 1: VM a"),
        "{summary}"
    );
    assert!(bundle.join("host/kernel.log").exists());
    assert!(bundle.join("vms/a/info.json").exists());

    for id in ["a", "b"] {
        let last = common::last_tick(&read_console(&pair.console(id)));
        let console = wait_for_tick(&pair.console(id), last + 3, Duration::from_secs(30));
        assert_eq!(banners(&console), 1, "VM {id} rebooted:\n{console}");
        assert_consecutive_ok_ticks(&console);
    }
}

#[test]
fn diagnose_names_a_vmm_that_does_not_answer_its_api() {
    require_kvm!();
    let pair = Pair::start();
    let pid = pair.vms[1].pid() as i32;
    // SAFETY: stopping and continuing our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let bundle = pair.dir.path().join("bundle");
    let out = host(
        &pair.root(),
        &["diagnose", "--out", bundle.to_str().unwrap()],
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("summary.json")).unwrap()).unwrap();
    let findings = summary["findings"].as_array().unwrap();
    assert!(
        findings.iter().any(|f| f["severity"] == "critical"
            && f["what"].as_str().unwrap().contains("VM b does not answer")),
        "{summary}"
    );
    assert!(
        !findings
            .iter()
            .any(|f| f["what"].as_str().unwrap().contains("VM a does not answer")),
        "{summary}"
    );
    for f in [
        "host/meminfo",
        "host/kernel.log",
        "vms/a/config.json",
        "vms/b/process-status.txt",
    ] {
        assert!(bundle.join(f).exists(), "bundle lacks {f}");
    }
}

#[test]
fn prepare_refuses_a_path_that_is_not_a_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-device");
    std::fs::write(&file, b"data").unwrap();
    let out = host(
        dir.path(),
        &[
            "prepare",
            "--device",
            file.to_str().unwrap(),
            "--mount",
            dir.path().join("m").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not a block device"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

#[test]
fn prepare_never_formats_a_device_that_holds_a_filesystem() {
    // A loop device with an ext4 filesystem holding a VM entry; needs root, losetup and
    // mkfs.ext4. A loop device has no DAX, so prepare must end with an error, but only
    // after deciding not to format.
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let have = |p: &str| Path::new(p).exists();
    if !root_user
        || !have("/usr/sbin/losetup") && !have("/sbin/losetup")
        || !have("/usr/sbin/mkfs.ext4") && !have("/sbin/mkfs.ext4")
    {
        eprintln!("SKIPPED prepare_never_formats_a_device_that_holds_a_filesystem: needs root, losetup and mkfs.ext4");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pmem.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let sh = |cmd: String| Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
    let out = sh(format!("mkfs.ext4 -q -F -b 4096 {0} && mkdir -p {1}/m && mount -o loop {0} {1}/m && mkdir -p {1}/m/vms/keep && echo precious > {1}/m/vms/keep/vm.state && umount {1}/m", img.display(), dir.path().display()));
    if !out.status.success() {
        eprintln!("SKIPPED prepare_never_formats_a_device_that_holds_a_filesystem: cannot mount a loop device here: {}", text(&out.stderr));
        return;
    }
    let loopdev = text(&sh(format!("losetup --find --show {}", img.display())).stdout)
        .trim()
        .to_string();
    if loopdev.is_empty() {
        eprintln!("SKIPPED prepare_never_formats_a_device_that_holds_a_filesystem: losetup found no free loop device");
        return;
    }
    let mnt = dir.path().join("state");
    let out = host(
        dir.path(),
        &[
            "prepare",
            "--device",
            &loopdev,
            "--mount",
            mnt.to_str().unwrap(),
        ],
    );
    let _ = sh(format!(
        "umount {} 2>/dev/null; losetup -d {loopdev}",
        mnt.display()
    ));
    // Whatever prepare concluded about DAX, the state must still be there.
    let check = sh(format!(
        "mount -o loop,ro {0} {1}/m && cat {1}/m/vms/keep/vm.state; umount {1}/m",
        img.display(),
        dir.path().display()
    ));
    assert_eq!(
        text(&check.stdout).trim(),
        "precious",
        "prepare formatted a device holding state: {}",
        text(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a loop device has no DAX, so prepare must refuse: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("without DAX") || text(&out.stderr).contains("dax"),
        "{}",
        text(&out.stderr)
    );
}
