//! The VMM side of the virtio devices with the built-in test guest on this machine's KVM:
//! a VM with two disks (one read-only) and, where a private network namespace can be
//! made, a network interface on a tap in it. The devices are opened, saved in snapshots,
//! restored across generations and carried across live updates; the disks and the tap
//! are let go of when the VMM exits.
//!
//! They need `/dev/kvm`. The tap needs root and `ip`: without them each test runs with
//! the disks only and prints `SKIPPED: <reason>` for its network part. The taps live in a
//! namespace of the test's own thread (see `common::in_private_netns`), never the host's.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    add_tap, assert_consecutive_ok_ticks, banners, ctl, ctl_ok, in_private_netns, open_files,
    read_console, shm_tempdir, skip, text, VmProcess,
};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(30);
const TAP: &str = "wbvirt0";
const MAC: &str = "52:54:00:5a:0b:01";

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// A disk image of `len` bytes that is not all zeros, so a write would show.
fn make_disk(path: &Path, len: usize) -> Vec<u8> {
    let bytes: Vec<u8> = (0..len).map(|i| (i * 13 + i / 512) as u8).collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// A directory with a writable 1 MiB disk `rw.img` (id `root`) and a read-only 64 KiB
/// disk `ro.img` (id `data`), and the tap when there is one.
struct Setup {
    dir: tempfile::TempDir,
    rw: PathBuf,
    ro: PathBuf,
    rw_bytes: Vec<u8>,
    ro_bytes: Vec<u8>,
    with_tap: bool,
}

impl Setup {
    fn new(with_tap: bool) -> Self {
        let dir = shm_tempdir();
        let rw = dir.path().join("rw.img");
        let ro = dir.path().join("ro.img");
        let rw_bytes = make_disk(&rw, 1 << 20);
        let ro_bytes = make_disk(&ro, 64 << 10);
        if with_tap {
            add_tap(TAP);
        }
        Setup {
            dir,
            rw,
            ro,
            rw_bytes,
            ro_bytes,
            with_tap,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The device options.
    fn devices(&self) -> Vec<String> {
        let mut a = vec![
            "--disk".to_string(),
            format!("path={},id=root", s(&self.rw)),
            "--disk".into(),
            format!("path={},readonly=on,id=data", s(&self.ro)),
        ];
        if self.with_tap {
            a.extend(["--net".into(), format!("tap={TAP},mac={MAC}")]);
        }
        a
    }

    /// Starts the built-in guest with the devices, `cmdline` and `extra`: state directory
    /// `state`, API socket `api.sock`, console `console`, all in the setup's directory.
    fn start(&self, cmdline: &str, extra: &[&str]) -> VmProcess {
        let d = self.dir.path();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--state-dir".into(),
            s(&d.join("state")).into(),
            "--api-socket".into(),
            s(&d.join("api.sock")).into(),
            "--serial".into(),
            format!("file={}", s(&d.join("console"))),
            "--memory".into(),
            "32M".into(),
            "--cmdline".into(),
            cmdline.into(),
        ];
        args.extend(self.devices());
        args.extend(extra.iter().map(|a| a.to_string()));
        VmProcess::spawn(
            d,
            "run",
            &args,
            &[],
            &d.join("api.sock"),
            &d.join("console"),
        )
    }

    fn assert_disks_unchanged(&self) {
        assert!(
            std::fs::read(&self.rw).unwrap() == self.rw_bytes,
            "the writable disk changed although the guest never drives it"
        );
        self.assert_ro_unchanged();
    }

    fn assert_ro_unchanged(&self) {
        assert!(
            std::fs::read(&self.ro).unwrap() == self.ro_bytes,
            "the read-only disk changed"
        );
    }
}

/// Runs `body(true)` in a private network namespace with a tap, or, when there can be
/// none here, says so and runs `body(false)` without the network interface.
fn with_optional_tap(test: &str, body: fn(bool)) {
    if let Err(reason) = in_private_netns(move || body(true)) {
        skip(&format!(
            "{test}: the network interface part did not run: {reason}"
        ));
        body(false);
    }
}

/// `waterbear snapshot inspect DIR` as JSON.
fn inspect(snap: &Path) -> Value {
    let out = Command::new(common::waterbear())
        .args(["snapshot", "inspect"])
        .arg(snap)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "inspect {} failed: {}",
        snap.display(),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("inspect prints JSON")
}

/// Checks that a snapshot's configuration and device states describe the setup's devices,
/// in order: both disks with their ids, read-only flags, capacities and paths, and the
/// network interface with its tap and MAC. Returns the backend part of each device state
/// (what must stay the same across generations).
fn check_devices(j: &Value, setup: &Setup) -> Vec<Value> {
    let config = &j["config"];
    let disks = config["disks"].as_array().expect("config.disks");
    assert_eq!(disks.len(), 2, "{config}");
    assert_eq!(disks[0]["id"], "root", "{config}");
    assert_eq!(disks[0]["read_only"], false, "{config}");
    assert_eq!(disks[0]["path"], s(&setup.rw), "{config}");
    assert_eq!(disks[1]["id"], "data", "{config}");
    assert_eq!(disks[1]["read_only"], true, "{config}");
    assert_eq!(disks[1]["path"], s(&setup.ro), "{config}");
    let nets = config["nets"].as_array().expect("config.nets");
    let virtio = j["devices"]["virtio"].as_array().expect("devices.virtio");
    let backends: Vec<Value> = virtio
        .iter()
        .map(|d| {
            if let Some(b) = d.get("block") {
                assert_eq!(b["transport"]["device_type"], 2, "{d}");
                b["disk"].clone()
            } else if let Some(n) = d.get("net") {
                assert_eq!(n["transport"]["device_type"], 1, "{d}");
                let mut net = n["net"].clone();
                // Counters may move with traffic; the identity must not.
                net.as_object_mut().unwrap().remove("counters");
                net
            } else {
                panic!("unknown virtio device state {d}")
            }
        })
        .collect();
    let mut want = vec![
        serde_json::json!({"id": "root", "read_only": false, "capacity_sectors": 2048}),
        serde_json::json!({"id": "data", "read_only": true, "capacity_sectors": 128}),
    ];
    if setup.with_tap {
        assert_eq!(
            nets,
            &vec![serde_json::json!({"tap": TAP, "mac": MAC})],
            "{config}"
        );
        want.push(serde_json::json!({"tap": TAP, "mac": MAC}));
    } else {
        assert!(nets.is_empty(), "{config}");
    }
    assert_eq!(backends, want, "the saved virtio devices:\n{j}");
    backends
}

/// Asserts that process `pid` holds exactly one descriptor of `/dev/net/tun` (if there
/// is a tap) and of each disk; returns all its descriptors' targets.
fn check_fds(pid: u32, setup: &Setup, when: &str) -> Vec<PathBuf> {
    let files = open_files(pid);
    let count = |p: &Path| files.iter().filter(|f| f.as_path() == p).count();
    let tun = count(Path::new("/dev/net/tun"));
    assert_eq!(
        tun,
        usize::from(setup.with_tap),
        "{when}: {tun} descriptors of /dev/net/tun: {files:?}"
    );
    assert_eq!(
        count(&setup.rw),
        1,
        "{when}: descriptors of the writable disk: {files:?}"
    );
    assert_eq!(
        count(&setup.ro),
        1,
        "{when}: descriptors of the read-only disk: {files:?}"
    );
    files
}

/// Runs the built-in guest with the setup's devices for `ticks` ticks to its end.
fn run_to_end(setup: &Setup, ticks: u64) -> String {
    let console = setup.path("console");
    let _ = std::fs::remove_file(&console);
    let mut vm = setup.start(&format!("ticks={ticks} tick_ms=20"), &[]);
    let status = vm.wait_exit(BOOT);
    let out = read_console(&console);
    assert_eq!(
        status.code(),
        Some(0),
        "the guest did not run to its end: {}\n{out}",
        vm.stderr_text()
    );
    assert!(
        out.contains(&format!("done {ticks} ")) && out.trim_end().ends_with("ok"),
        "{out}"
    );
    out
}

#[test]
fn a_guest_with_two_disks_and_a_tap_runs_to_its_end_and_lets_them_go() {
    require_kvm!();
    with_optional_tap(
        "a_guest_with_two_disks_and_a_tap_runs_to_its_end_and_lets_them_go",
        |with_tap| {
            let setup = Setup::new(with_tap);
            run_to_end(&setup, 5);
            setup.assert_disks_unchanged();
            // Everything was let go of: the same devices open again at once, also
            // with cmdline discovery.
            run_to_end(&setup, 2);
            let mut vm = setup.start("ticks=2", &["--virtio-discovery", "cmdline"]);
            assert_eq!(
                vm.wait_exit(BOOT).code(),
                Some(0),
                "cmdline discovery: {}",
                vm.stderr_text()
            );
            setup.assert_disks_unchanged();
            assert!(
                !setup.path("state").exists(),
                "the state directory was left behind"
            );
        },
    );
}

#[test]
fn snapshot_and_restore_keep_the_devices_across_generations() {
    require_kvm!();
    with_optional_tap(
        "snapshot_and_restore_keep_the_devices_across_generations",
        |with_tap| {
            let setup = Setup::new(with_tap);
            let console = setup.path("console");
            let api = setup.path("api.sock");
            // The guest drives the first disk (disk=1): its device is started, with
            // ring positions in the state, and it writes the disk.
            let mut vm = setup.start("tick_ms=50 disk=1", &[]);
            vm.wait_api(BOOT);
            vm.wait_tick(3, BOOT);
            let mut saved: Option<Vec<Value>> = None;
            for generation in 1..=3u64 {
                let snap = setup.path(&format!("snap{generation}"));
                let report = ctl_ok(&api, &["snapshot", s(&snap), "--keep-paused"]);
                assert_eq!(report["restorable"], true, "{report}");
                vm.shutdown();
                let before = read_console(&console);
                let j = inspect(&snap);
                let backends = check_devices(&j, &setup);
                let first = &j["devices"]["virtio"][0]["block"]["transport"];
                assert_eq!(first["status"], 15, "disk=1 started the first disk: {j}");
                if let Some(prev) = &saved {
                    assert_eq!(&backends, prev, "generation {generation} changed them");
                }
                saved = Some(backends);
                setup.assert_ro_unchanged();
                vm = VmProcess::spawn(
                    setup.dir.path(),
                    &format!("restore{generation}"),
                    &["restore", "--from", s(&snap)],
                    &[],
                    &api,
                    &console,
                );
                let info = vm.wait_api(BOOT);
                let last = common::last_tick(&before);
                let after = vm.wait_tick(last + 3, BOOT);
                assert!(after.starts_with(&before), "the console was rewritten");
                assert_eq!(banners(&after), 1, "the guest booted again:\n{after}");
                assert_consecutive_ok_ticks(&after);
                assert!(
                    !after.contains("BAD"),
                    "the guest's disk check failed after restore {generation}:\n{after}"
                );
                assert_eq!(info["state"], "running", "restore {generation}: {info}");
            }
            vm.shutdown();
            setup.assert_ro_unchanged();
        },
    );
}

#[test]
fn a_live_update_keeps_the_devices_and_leaks_no_descriptors() {
    require_kvm!();
    with_optional_tap(
        "a_live_update_keeps_the_devices_and_leaks_no_descriptors",
        |with_tap| {
            let setup = Setup::new(with_tap);
            let api = setup.path("api.sock");
            let mut vm = setup.start("tick_ms=50", &["--virtio-discovery", "cmdline"]);
            vm.wait_api(BOOT);
            vm.wait_tick(2, BOOT);
            let pid = vm.pid();
            check_fds(pid, &setup, "before the live update");
            let mut counts = Vec::new();
            for n in 1..=3 {
                let report = ctl_ok(&api, &["update"]);
                assert_eq!(report["outcome"], "updated", "update {n}: {report}");
                let info = ctl_ok(&api, &["info"]);
                assert_eq!(info["pid"], pid, "update {n} changed the pid: {info}");
                let files = check_fds(pid, &setup, &format!("after live update {n}"));
                counts.push(files.len());
                let tick = common::last_tick(&read_console(&vm.console));
                vm.wait_tick(tick + 2, BOOT);
            }
            assert!(
                counts.windows(2).all(|w| w[0] == w[1]),
                "the VMM's descriptors grow with each live update: {counts:?}"
            );
            // The devices are still the VM's: a snapshot after the updates has them.
            let snap = setup.path("snap");
            let report = ctl_ok(&api, &["snapshot", s(&snap), "--keep-paused"]);
            assert_eq!(report["restorable"], true, "{report}");
            let j = inspect(&snap);
            check_devices(&j, &setup);
            assert_eq!(
                j["config"]["virtio_discovery"], "cmdline",
                "{}",
                j["config"]
            );
            vm.shutdown();
            setup.assert_disks_unchanged();
            // Let go of after the exit: the tap and the disks open again (no
            // descriptor survived in some other process).
            run_to_end(&setup, 2);
            setup.assert_disks_unchanged();
        },
    );
}

#[test]
fn a_snapshot_of_a_vm_with_a_writable_disk_on_tmpfs_succeeds() {
    require_kvm!();
    let setup = Setup::new(false);
    let fs = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&setup.rw)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let fs = text(&fs.stdout);
    if fs.trim() != "tmpfs" {
        skip(&format!(
            "a_snapshot_of_a_vm_with_a_writable_disk_on_tmpfs_succeeds: the temporary \
             directory is on {}, not tmpfs (/dev/shm missing?)",
            fs.trim()
        ));
        return;
    }
    let api = setup.path("api.sock");
    let mut vm = setup.start("tick_ms=50 disk=1", &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(2, BOOT);
    // Without --keep-paused the guest goes on (and writes its disk) after the snapshot.
    let report = ctl_ok(&api, &["snapshot", s(&setup.path("snap1"))]);
    assert_eq!(report["paused"], false, "{report}");
    let tick = common::last_tick(&read_console(&vm.console));
    vm.wait_tick(tick + 2, BOOT);
    let report = ctl_ok(
        &api,
        &["snapshot", s(&setup.path("snap2")), "--keep-paused"],
    );
    assert_eq!(report["restorable"], true, "{report}");
    let info = ctl_ok(&api, &["info"]);
    assert_eq!(info["state"], "paused", "{info}");
    let out = ctl(&api, &["resume"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let tick = common::last_tick(&read_console(&vm.console));
    let console = vm.wait_tick(tick + 2, BOOT);
    assert!(!console.contains("BAD"), "{console}");
    vm.shutdown();
    setup.assert_ro_unchanged();
}

// ---- A live update when the disks or taps changed under the running VM. A live update
// ---- must never lose the guest: it may refuse, fall back or carry on with the devices
// ---- the guest has, but the guest must still run afterwards, on its own disk.

/// Runs `ctl update` on `vm` and waits until it answers or the VMM exits (`ctl update`
/// waits 60 s for a VMM that is gone). Panics, saying the guest is lost, if the VMM
/// exited; otherwise returns the report (Null if none) for the caller to log.
fn update_keeping_the_guest(vm: &mut VmProcess, what: &str) -> Value {
    let mut update = Command::new(common::waterbear())
        .args(["ctl", "--api-socket", s(&vm.api), "update"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vmm_gone = None;
    common::wait_until("the update to finish or the VMM to exit", BOOT, || {
        vmm_gone = vm.try_exit();
        vmm_gone.is_some() || update.try_wait().unwrap().is_some()
    });
    if let Some(status) = vmm_gone {
        let _ = update.kill();
        let _ = update.wait();
        panic!(
            "the VMM exited ({status}) during a live update {what}: the guest is lost.\n\
             VMM stderr: {}",
            vm.stderr_text()
        );
    }
    let out = update.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    eprintln!(
        "live update {what}: exit {:?}, {report} {}",
        out.status.code(),
        text(&out.stderr)
    );
    // The guest still runs and the API answers.
    let info = ctl_ok(&vm.api, &["info"]);
    assert_eq!(info["state"], "running", "after the update {what}: {info}");
    let tick = common::last_tick(&read_console(&vm.console));
    vm.wait_tick(tick + 3, BOOT);
    report
}

#[test]
fn a_live_update_after_the_disk_file_was_deleted_keeps_the_guest() {
    require_kvm!();
    let setup = Setup::new(false);
    let mut vm = setup.start("tick_ms=50 disk=1", &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(2, BOOT);
    // The file is gone from the directory; the VMM still has it open.
    std::fs::remove_file(&setup.rw).unwrap();
    update_keeping_the_guest(&mut vm, "after the disk file was deleted");
    let console = read_console(&vm.console);
    assert!(!console.contains("BAD"), "{console}");
    vm.shutdown();
}

#[test]
fn a_live_update_after_the_disk_file_was_replaced_keeps_the_guest_on_its_disk() {
    require_kvm!();
    let setup = Setup::new(false);
    let mut vm = setup.start("tick_ms=50 disk=1", &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(2, BOOT);
    // Someone moves the image away and puts another of the same size in its place: the
    // guest's disk is the moved file, whose data its filesystem relies on.
    let moved = setup.path("moved.img");
    std::fs::rename(&setup.rw, &moved).unwrap();
    let stranger = make_disk(&setup.rw, 1 << 20);
    update_keeping_the_guest(&mut vm, "after the disk file was replaced");
    vm.shutdown();
    assert!(
        std::fs::read(&setup.rw).unwrap() == stranger,
        "after the live update the guest wrote to the file that replaced its disk: the \
         new process reopened the disk by path and gave the guest another disk"
    );
}

#[test]
fn a_live_update_after_the_tap_was_deleted_keeps_the_guest() {
    require_kvm!();
    let body = || {
        let setup = Setup::new(true);
        let mut vm = setup.start("tick_ms=50", &[]);
        vm.wait_api(BOOT);
        vm.wait_tick(2, BOOT);
        common::ip(&["link", "del", TAP]);
        update_keeping_the_guest(&mut vm, "after the tap was deleted");
        // Refused before the guest was touched, saying what happened and what to do.
        let out = common::ctl(&vm.api, &["update"]);
        let err = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{err}");
        assert!(err.contains("409") && err.contains("was deleted"), "{err}");
        assert!(err.contains("--keep-paused"), "{err}");
        vm.shutdown();
    };
    if let Err(reason) = in_private_netns(body) {
        skip(&format!(
            "a_live_update_after_the_tap_was_deleted_keeps_the_guest: {reason}"
        ));
    }
}
