//! Bad snapshots given to `waterbear restore --from DIR` (and `snapshot inspect`): each
//! test takes a good snapshot of the built-in guest, damages it, and checks the restore
//! exits non-zero with an error naming the offending file and changes nothing on disk.
//! They need `/dev/kvm` to take the snapshot and skip with a printed reason without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{ctl_ok, read_console, shm_tempdir, start_builtin_vm, tree_with_bytes, VmProcess};

const BOOT: Duration = Duration::from_secs(30);

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// A good snapshot of a built-in guest whose VMM has shut down.
struct Saved {
    snap: PathBuf,
    /// The guest memory file: referenced for file-backed memory, `snap/memory` for memfd.
    mem: PathBuf,
}

impl Saved {
    fn state(&self) -> PathBuf {
        self.snap.join("vm.state")
    }

    fn marker(&self) -> PathBuf {
        PathBuf::from(format!("{}.waterbear-saved", self.mem.display()))
    }
}

/// Boots the built-in guest in `root/name`, snapshots it with `--keep-paused` into
/// `root/name/snap` and shuts it down. `file_backed` puts its memory in
/// `root/name/guest.mem`; otherwise it is a memfd written out by the snapshot.
fn take_snapshot(root: &Path, name: &str, file_backed: bool) -> Saved {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    let file = d.join("guest.mem");
    let extra: Vec<&str> = if file_backed {
        vec!["--memory-file", s(&file)]
    } else {
        vec![]
    };
    let snap = d.join("snap");
    let mut vm = start_builtin_vm(&d, &extra, &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(2, BOOT);
    let report = ctl_ok(&vm.api, &["snapshot", s(&snap), "--keep-paused"]);
    assert_eq!(report["restorable"], true, "{report}");
    vm.shutdown();
    let mem = if file_backed {
        file
    } else {
        snap.join("memory")
    };
    let saved = Saved { snap, mem };
    assert!(saved.state().is_file() && saved.mem.is_file() && saved.marker().is_file());
    saved
}

/// Expects `restore --from FROM EXTRA...` to fail with an error containing every one of
/// `needles`, and every file under `root` to be unchanged, bytes included.
fn expect_refused(root: &Path, from: &Path, extra: &[&str], needles: &[&str]) {
    let logs = tempfile::tempdir().unwrap();
    let before = tree_with_bytes(root);
    let (code, stderr) = common::run_restore(logs.path(), from, extra);
    assert!(
        code.is_some_and(|c| c != 0),
        "restore --from {} was accepted (exit {code:?}): {stderr}",
        from.display()
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "the error does not name {needle:?}: {stderr}"
        );
    }
    eprintln!("refused as expected: {}", stderr.trim_end());
    let after = tree_with_bytes(root);
    let paths =
        |t: &[(PathBuf, Option<Vec<u8>>)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(paths(&after), paths(&before), "files appeared or vanished");
    for ((path, a), (_, b)) in after.iter().zip(&before) {
        assert!(a == b, "{} changed", path.display());
    }
}

fn flip_bit(path: &Path, byte: usize, bit: u8) {
    let mut b = std::fs::read(path).unwrap();
    b[byte] ^= 1 << bit;
    std::fs::write(path, &b).unwrap();
}

fn payload_len(state: &Path) -> usize {
    let b = std::fs::read(state).unwrap();
    u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize
}

#[test]
fn restore_rejects_a_truncated_state_file() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", true);
    let state = saved.state();
    let good = std::fs::read(&state).unwrap();

    std::fs::write(&state, &good[..good.len() - 1]).unwrap();
    expect_refused(root.path(), &saved.snap, &[], &[s(&state), "truncated"]);
    std::fs::write(&state, &good[..20]).unwrap();
    expect_refused(root.path(), &saved.snap, &[], &[s(&state)]);
    std::fs::write(&state, b"").unwrap();
    expect_refused(root.path(), &saved.snap, &[], &[s(&state)]);
}

#[test]
fn restore_rejects_a_state_file_with_a_flipped_payload_bit() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", true);
    let state = saved.state();
    flip_bit(&state, 32 + payload_len(&state) / 2, 3);
    expect_refused(root.path(), &saved.snap, &[], &[s(&state), "checksum"]);
}

#[test]
fn restore_rejects_a_state_file_with_a_flipped_header_bit() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", true);
    let state = saved.state();
    // The lowest byte of the payload length: only the header checksum can tell.
    flip_bit(&state, 16, 0);
    expect_refused(root.path(), &saved.snap, &[], &[s(&state), "header"]);
}

#[test]
fn restore_rejects_a_state_file_of_another_format_version() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", true);
    let state = saved.state();
    // A format from a newer waterbear.
    let mut b = std::fs::read(&state).unwrap();
    b[8..12].copy_from_slice(&3u32.to_le_bytes());
    let crc = crc32fast::hash(&b[0..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&state, &b).unwrap();
    expect_refused(root.path(), &saved.snap, &[], &[s(&state), "version 3"]);
}

#[test]
fn restore_rejects_a_state_file_with_wrong_magic() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", true);
    let state = saved.state();
    let mut b = std::fs::read(&state).unwrap();
    b[0..8].copy_from_slice(b"NOTASNAP");
    std::fs::write(&state, &b).unwrap();
    expect_refused(root.path(), &saved.snap, &[], &[s(&state), "magic"]);
}

#[test]
fn restore_rejects_a_memory_file_shorter_than_the_state_says() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", true);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&saved.mem)
        .unwrap();
    f.set_len(16 << 20).unwrap();
    drop(f);
    expect_refused(
        root.path(),
        &saved.snap,
        &[],
        &[s(&saved.mem), &(16u64 << 20).to_string()],
    );
}

#[test]
fn restore_rejects_a_memory_file_longer_than_the_state_says() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", true);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&saved.mem)
        .unwrap();
    f.set_len(48 << 20).unwrap();
    drop(f);
    expect_refused(
        root.path(),
        &saved.snap,
        &[],
        &[s(&saved.mem), &(48u64 << 20).to_string()],
    );
}

#[test]
fn restore_rejects_a_missing_memory_file() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", true);
    std::fs::rename(&saved.mem, root.path().join("moved.mem")).unwrap();
    expect_refused(root.path(), &saved.snap, &[], &[s(&saved.mem)]);
}

#[test]
fn restore_rejects_a_missing_memory_file_of_a_memfd_snapshot() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", false);
    std::fs::remove_file(&saved.mem).unwrap();
    expect_refused(root.path(), &saved.snap, &[], &[s(&saved.mem)]);
}

#[test]
fn restore_rejects_a_snapshot_directory_whose_memory_marker_is_another_snapshots() {
    require_kvm!();
    let root = shm_tempdir();
    let a = take_snapshot(root.path(), "a", false);
    let b = take_snapshot(root.path(), "b", false);
    // Each directory keeps its own memory and marker but gets the other's state and
    // description (swapping only vm.state is caught earlier, by the description).
    for name in ["vm.state", "vm.json"] {
        let tmp = root.path().join("swap");
        std::fs::rename(a.snap.join(name), &tmp).unwrap();
        std::fs::rename(b.snap.join(name), a.snap.join(name)).unwrap();
        std::fs::rename(&tmp, b.snap.join(name)).unwrap();
    }
    expect_refused(root.path(), &a.snap, &[], &[s(&a.mem), "another snapshot"]);
    expect_refused(root.path(), &b.snap, &[], &[s(&b.mem), "another snapshot"]);
}

#[test]
fn restore_rejects_a_damaged_or_swapped_description() {
    require_kvm!();
    let root = shm_tempdir();
    let a = take_snapshot(root.path(), "a", false);
    let desc = a.snap.join("vm.json");
    let bytes = std::fs::read(&desc).unwrap();
    std::fs::write(&desc, &bytes[..100.min(bytes.len())]).unwrap();
    expect_refused(root.path(), &a.snap, &[], &[s(&desc), "damaged"]);
    let b = take_snapshot(root.path(), "b", false);
    std::fs::copy(b.snap.join("vm.json"), &desc).unwrap();
    expect_refused(root.path(), &a.snap, &[], &[s(&desc), "another snapshot"]);
}

#[test]
fn restore_rejects_a_stale_snapshot_of_memory_that_was_snapshotted_again() {
    require_kvm!();
    let root = shm_tempdir();
    let d = root.path().join("vm");
    std::fs::create_dir(&d).unwrap();
    let mem = d.join("guest.mem");
    let (old, new) = (d.join("old"), d.join("new"));
    let mut vm = start_builtin_vm(&d, &["--memory-file", s(&mem)], &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(2, BOOT);
    let first = ctl_ok(&vm.api, &["snapshot", s(&old)]);
    assert_eq!(
        first["restorable"], false,
        "resumed on memory kept in place: {first}"
    );
    let at = common::last_tick(&read_console(&vm.console));
    vm.wait_tick(at + 2, BOOT);
    ctl_ok(&vm.api, &["snapshot", s(&new), "--keep-paused"]);
    vm.shutdown();
    expect_refused(root.path(), &old, &[], &[s(&mem), "another snapshot"]);
}

#[test]
fn restore_rejects_memory_in_use_by_a_live_paused_vm() {
    require_kvm!();
    let root = shm_tempdir();
    let d = root.path().join("vm");
    std::fs::create_dir(&d).unwrap();
    let mem = d.join("guest.mem");
    let snap = d.join("snap");
    let mut vm = start_builtin_vm(&d, &["--memory-file", s(&mem)], &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(2, BOOT);
    ctl_ok(&vm.api, &["snapshot", s(&snap), "--keep-paused"]);
    // The paused VM still runs its VMM and holds the memory file.
    let other = root.path().join("other");
    let sock = root.path().join("other.sock");
    expect_refused(
        root.path(),
        &snap,
        &[
            "--state-dir",
            s(&other),
            "--api-socket",
            s(&sock),
            "--serial",
            "null",
        ],
        &[s(&mem), "in use"],
    );
    assert_eq!(ctl_ok(&vm.api, &["info"])["state"], "paused");
    vm.shutdown();
}

#[test]
fn restore_rejects_a_second_restore_of_a_snapshot_that_is_running() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", true);
    let d = root.path().join("vm");
    let mut first = VmProcess::spawn(
        &d,
        "restore1",
        &["restore", "--from", s(&saved.snap), "--serial", "null"],
        &[],
        &d.join("api.sock"),
        &d.join("console"),
    );
    first.wait_api(BOOT);

    // The running guest changes its memory file, so leave its bytes out of the check.
    let logs = tempfile::tempdir().unwrap();
    let strip = |t: Vec<(PathBuf, Option<Vec<u8>>)>| -> Vec<(PathBuf, Option<Vec<u8>>)> {
        t.into_iter()
            .map(|(p, b)| if p == saved.mem { (p, None) } else { (p, b) })
            .collect()
    };
    let before = strip(tree_with_bytes(root.path()));
    let (code, stderr) = common::run_restore(logs.path(), &saved.snap, &[]);
    assert!(
        code.is_some_and(|c| c != 0),
        "a second restore ran: {stderr}"
    );
    assert!(
        stderr.contains(s(&saved.mem)),
        "the error does not name the memory file {}: {stderr}",
        saved.mem.display()
    );
    assert!(
        strip(tree_with_bytes(root.path())) == before,
        "files changed"
    );
    assert_eq!(
        std::fs::metadata(&saved.mem).unwrap().len(),
        32 << 20,
        "the memory file was resized"
    );
    assert_eq!(ctl_ok(&first.api, &["info"])["state"], "running");
    first.shutdown();
}

#[test]
fn restore_rejects_a_missing_snapshot_directory() {
    require_kvm!();
    let root = shm_tempdir();
    let missing = root.path().join("no-such-snapshot");
    expect_refused(root.path(), &missing, &[], &[s(&missing)]);
}

#[test]
fn inspect_rejects_a_corrupt_state_file_naming_it() {
    require_kvm!();
    let root = shm_tempdir();
    let saved = take_snapshot(root.path(), "vm", true);
    let state = saved.state();
    let inspect = |arg: &Path| {
        Command::new(common::waterbear())
            .args(["snapshot", "inspect"])
            .arg(arg)
            .output()
            .unwrap()
    };
    let good = inspect(&state);
    assert!(good.status.success(), "{}", common::text(&good.stderr));
    let json: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(json["header"]["version"], 2, "{json}");

    flip_bit(&state, 32 + payload_len(&state) / 3, 5);
    let before = tree_with_bytes(root.path());
    for arg in [state.as_path(), saved.snap.as_path()] {
        let out = inspect(arg);
        let stderr = common::text(&out.stderr);
        assert!(
            out.status.code().is_some_and(|c| c != 0),
            "inspect of a corrupt {} succeeded: {}",
            arg.display(),
            common::text(&out.stdout)
        );
        assert!(
            stderr.contains(s(&state)),
            "the error does not name {}: {stderr}",
            state.display()
        );
    }
    assert!(
        tree_with_bytes(root.path()) == before,
        "inspect changed files"
    );
}
