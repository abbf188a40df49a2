//! Restores whose disks or taps are not what the snapshot was taken with: each refusal
//! exits 1 naming the disk or tap and leaves the snapshot directory and memory file as
//! they were; putting things back makes the same restore work. Taps live in private
//! network namespaces (see `common::in_private_netns`).

mod common;
mod virtio_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    add_tap, ctl_ok, ip, read_console, shm_tempdir, start_builtin_vm, text, tree_with_bytes,
    VmProcess,
};
use virtio_support::*;

// ---- Restores whose disks or taps changed since the snapshot. ----

/// Boots the built-in guest in `dir` with `extra`, waits for tick 2, snapshots it with
/// `--keep-paused` into `dir/snap` and shuts it down; returns the snapshot directory and
/// the last tick the console shows.
fn take_snapshot(dir: &Path, extra: &[&str]) -> (PathBuf, u64) {
    let snap = dir.join("snap");
    let mut vm = start_builtin_vm(dir, extra, &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(2, BOOT);
    let report = ctl_ok(&vm.api, &["snapshot", s(&snap), "--keep-paused"]);
    assert_eq!(report["restorable"], true, "{report}");
    let tick = common::last_tick(&read_console(&dir.join("console")));
    vm.shutdown();
    assert!(snap.join("vm.state").is_file() && snap.join("memory").is_file());
    (snap, tick)
}

/// `waterbear restore --from SNAP` (with its state as saved) must exit 1 naming every
/// one of `needles`, and leave every file under `root` as it was.
fn expect_restore_refused(root: &Path, snap: &Path, needles: &[&str]) {
    let logs = tempfile::tempdir().unwrap();
    let before = tree_with_bytes(root);
    let (code, stderr) = common::run_restore(logs.path(), snap, &[]);
    assert_eq!(
        code,
        Some(1),
        "restore not refused (exit {code:?}): {stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "the restore error does not name {needle:?}: {stderr}"
        );
    }
    assert_unchanged(root, &before, "a refused restore");
}

/// Restores `snap` (as saved: state dir, API socket and console in `dir`), checks the
/// guest carries on from after `tick` without booting again, and shuts it down.
fn expect_restore_runs(dir: &Path, snap: &Path, tick: u64) {
    let api = dir.join("api.sock");
    let console = dir.join("console");
    let mut vm = VmProcess::spawn(
        dir,
        "restore",
        &["restore", "--from", s(snap)],
        &[],
        &api,
        &console,
    );
    vm.wait_api(BOOT);
    let text = vm.wait_tick(tick + 3, BOOT);
    assert_eq!(common::banners(&text), 1, "the guest booted again:\n{text}");
    common::assert_consecutive_ok_ticks(&text);
    vm.shutdown();
}

#[test]
fn restore_refuses_a_disk_of_another_size() {
    require_kvm!();
    let root = shm_tempdir();
    let d = root.path().join("vm");
    std::fs::create_dir(&d).unwrap();
    let disk = d.join("disk.img");
    make_disk(&disk, 1 << 20);
    let ro = d.join("ro.img");
    make_disk(&ro, 64 << 10);
    let (snap, tick) = take_snapshot(
        &d,
        &[
            "--disk",
            &format!("path={}", s(&disk)),
            "--disk",
            &format!("path={},readonly=on,id=ro", s(&ro)),
        ],
    );
    let original = std::fs::read(&disk).unwrap();
    let set_len = |p: &Path, len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(len)
            .unwrap()
    };
    set_len(&disk, 2 << 20);
    expect_restore_refused(root.path(), &snap, &[s(&disk), "2048", "4096"]);
    set_len(&disk, 512 << 10);
    expect_restore_refused(root.path(), &snap, &[s(&disk), "2048", "1024"]);
    set_len(&disk, (1 << 20) - 1);
    expect_restore_refused(root.path(), &snap, &[s(&disk), "2047"]);
    std::fs::write(&disk, &original).unwrap();
    // The read-only disk too.
    set_len(&ro, 512);
    expect_restore_refused(root.path(), &snap, &[s(&ro), "128", "is now 1"]);
    make_disk(&ro, 64 << 10);
    expect_restore_runs(&d, &snap, tick);
    assert!(
        std::fs::read(&disk).unwrap() == original,
        "the disk changed"
    );
}

#[test]
fn restore_refuses_a_deleted_disk() {
    require_kvm!();
    let root = shm_tempdir();
    let d = root.path().join("vm");
    std::fs::create_dir(&d).unwrap();
    let disk = d.join("disk.img");
    make_disk(&disk, 1 << 20);
    let (snap, tick) = take_snapshot(&d, &["--disk", &format!("path={}", s(&disk))]);
    let away = root.path().join("elsewhere.img");
    std::fs::rename(&disk, &away).unwrap();
    expect_restore_refused(root.path(), &snap, &[s(&disk)]);
    // A directory where the disk was.
    std::fs::create_dir(&disk).unwrap();
    expect_restore_refused(root.path(), &snap, &[s(&disk)]);
    std::fs::remove_dir(&disk).unwrap();
    std::fs::rename(&away, &disk).unwrap();
    expect_restore_runs(&d, &snap, tick);
}

#[test]
fn restore_refuses_a_disk_in_use_by_another_vm() {
    require_kvm!();
    let root = shm_tempdir();
    let other = shm_tempdir();
    let d = root.path().join("vm");
    std::fs::create_dir(&d).unwrap();
    let disk = d.join("disk.img");
    make_disk(&disk, 1 << 20);
    let (snap, tick) = take_snapshot(&d, &["--disk", &format!("path={}", s(&disk))]);
    let mut vm = start_builtin_vm(
        other.path(),
        &["--disk", &format!("path={},readonly=on", s(&disk))],
        &[],
    );
    vm.wait_api(BOOT);
    expect_restore_refused(root.path(), &snap, &[s(&disk), "in use"]);
    vm.shutdown();
    expect_restore_runs(&d, &snap, tick);
}

#[test]
fn restore_refuses_a_tap_that_is_gone_or_busy() {
    require_kvm!();
    with_netns("restore_refuses_a_tap_that_is_gone_or_busy", || {
        add_tap("wbrest0");
        let root = shm_tempdir();
        let other = shm_tempdir();
        let d = root.path().join("vm");
        std::fs::create_dir(&d).unwrap();
        let disk = d.join("disk.img");
        make_disk(&disk, 1 << 20);
        let (snap, tick) = take_snapshot(
            &d,
            &[
                "--disk",
                &format!("path={},readonly=on", s(&disk)),
                "--net",
                "tap=wbrest0,mac=52:54:00:aa:bb:01",
            ],
        );
        ip(&["link", "del", "wbrest0"]);
        expect_restore_refused(root.path(), &snap, &["wbrest0", "does not exist"]);
        // Not created by the refused restore.
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        assert!(
            !text(&links.stdout).contains("wbrest0"),
            "the refused restore created the tap"
        );
        // Something else of that name.
        ip(&["tuntap", "add", "dev", "wbrest0", "mode", "tun"]);
        expect_restore_refused(root.path(), &snap, &["wbrest0", "not a tap"]);
        ip(&["link", "del", "wbrest0"]);
        add_tap("wbrest0");
        let mut vm = start_builtin_vm(other.path(), &["--net", "tap=wbrest0"], &[]);
        vm.wait_api(BOOT);
        expect_restore_refused(root.path(), &snap, &["wbrest0", "busy"]);
        vm.shutdown();
        expect_restore_runs(&d, &snap, tick);
    });
}

#[test]
fn a_saved_vms_memory_file_is_refused_as_a_writable_disk() {
    // `run` refuses a --memory-file whose marker says it holds a saved VM's memory, so a
    // fresh boot cannot overwrite a saved guest; a writable --disk on that file would let
    // another guest overwrite it all the same (and a restore then runs on the damage).
    require_kvm!();
    let root = shm_tempdir();
    let d = root.path().join("vm");
    std::fs::create_dir(&d).unwrap();
    let mem = d.join("guest.mem");
    let snap = d.join("snap");
    let mut vm = start_builtin_vm(&d, &["--memory-file", s(&mem)], &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(2, BOOT);
    let report = ctl_ok(&vm.api, &["snapshot", s(&snap), "--keep-paused"]);
    assert_eq!(report["restorable"], true, "{report}");
    vm.shutdown();
    assert!(Path::new(&format!("{}.waterbear-saved", s(&mem))).is_file());
    expect_refused(
        root.path(),
        &["--disk", &format!("path={}", s(&mem))],
        &[s(&mem)],
    );
}
