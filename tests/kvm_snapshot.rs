//! KVM tests of snapshot, restore in a new process, live update and the control API,
//! with the built-in test guest: they need `/dev/kvm` (software KVM is enough) and skip
//! with a printed reason without it.
//!
//! The guest prints `tick N sum S ok` from its timer; N comes from guest memory and S is
//! a checksum that depends only on N, so a guest that continued without a reset prints
//! N going up by exactly one, the same line for the same N in every process that ran it,
//! and "ok" throughout. Each restore or update prints its blackout.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{
    assert_consecutive_ok_ticks, banners, ctl, ctl_ok, last_tick, read_console, shm_tempdir,
    start_builtin_vm, text, ticks, wait_until, VmProcess,
};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(30);
const TICKS: Duration = Duration::from_secs(20);

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// The highest tick whose line is complete (ends in a newline) in `console`.
fn last_complete_tick(console: &str) -> u64 {
    match console.rfind('\n') {
        Some(i) => last_tick(&console[..=i]),
        None => 0,
    }
}

/// The complete tick lines of `console` by tick number.
fn tick_lines(console: &str) -> BTreeMap<u64, String> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| {
            let n = ticks(l).first()?.0;
            Some((n, l.trim_end().to_string()))
        })
        .collect()
}

/// Checks the console of a guest that was saved when its console held `before` and
/// continued in another process, which appended to the same console (`all`): one boot
/// banner, ticks up by exactly one across the boundary, every checksum ok, and at least
/// `more` ticks after it. Returns (last tick before, first tick after).
fn assert_continued(before: &str, all: &str, more: usize) -> (u64, u64) {
    assert!(
        all.starts_with(before),
        "the console was rewritten, not appended to"
    );
    assert_eq!(
        banners(all),
        1,
        "the guest booted again (a second banner): it was reset, not restored\n{all}"
    );
    let numbers = assert_consecutive_ok_ticks(all);
    let last_before = last_complete_tick(before);
    let after: Vec<u64> = numbers.into_iter().filter(|&n| n > last_before).collect();
    assert!(
        after.len() >= more,
        "only {} ticks after the restore (want {more}): the timer stopped?\n{all}",
        after.len()
    );
    assert_eq!(
        after[0],
        last_before + 1,
        "the first tick after the restore is not last-before + 1\n{all}"
    );
    (last_before, after[0])
}

fn restore(dir: &Path, label: &str, from: &Path, extra: &[&str]) -> VmProcess {
    let mut args = vec!["restore", "--from", s(from)];
    args.extend_from_slice(extra);
    VmProcess::spawn(
        dir,
        label,
        &args,
        &[],
        &dir.join("api.sock"),
        &dir.join("console"),
    )
}

fn ctl_update(api: &Path, binary: Option<&Path>) -> (Option<i32>, Value, String) {
    let mut args = vec!["update"];
    if let Some(b) = binary {
        args.extend(["--binary", s(b)]);
    }
    let out = ctl(api, &args);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), json, text(&out.stderr))
}

#[test]
fn restore_in_a_new_process_continues_a_file_backed_guest_without_reset() {
    require_kvm!();
    let dir = shm_tempdir();
    let d = dir.path();
    let mem = d.join("guest.mem");
    let snap = d.join("snap");
    let console = d.join("console");

    let mut vm = start_builtin_vm(d, &["--memory-file", s(&mem)], &[]);
    let info = vm.wait_api(BOOT);
    vm.wait_tick(3, TICKS);
    let report = ctl_ok(&vm.api, &["snapshot", s(&snap), "--keep-paused"]);
    eprintln!("snapshot blackout: {} ms", report["blackout_ms"]);
    assert_eq!(report["paused"], true, "{report}");
    assert_eq!(report["restorable"], true, "{report}");
    assert_eq!(report["memory"]["copied"], false, "{report}");
    assert_eq!(
        report["memory"]["path"],
        s(&mem.canonicalize().unwrap()),
        "{report}"
    );
    assert!(snap.join("vm.state").is_file() && snap.join("vm.json").is_file());
    assert!(
        !snap.join("memory").exists(),
        "file-backed memory was copied into the snapshot"
    );
    vm.shutdown();
    assert!(
        d.join("guest.mem.waterbear-saved").exists(),
        "the memory marker is gone after the paused VM shut down"
    );
    let before = read_console(&console);

    let mut restored = restore(d, "restore", &snap, &[]);
    let rinfo = restored.wait_api(BOOT);
    assert_eq!(rinfo["id"], info["id"], "{rinfo}");
    assert_eq!(rinfo["state"], "running", "{rinfo}");
    assert_ne!(rinfo["pid"], info["pid"], "{rinfo}");
    restored.wait_tick(last_complete_tick(&before) + 5, TICKS);
    assert!(
        !d.join("guest.mem.waterbear-saved").exists(),
        "the memory marker outlived the restore although the guest changes the memory"
    );
    restored.shutdown();

    let all = read_console(&console);
    let (last, first) = assert_continued(&before, &all, 5);
    eprintln!("last tick before the snapshot {last}, first after the restore {first}");
}

#[test]
fn memfd_snapshot_writes_memory_resumes_the_vm_and_restores_from_the_snapshot_tick() {
    require_kvm!();
    let dir = shm_tempdir();
    let d = dir.path();
    let snap = d.join("snap");
    let console = d.join("console");
    let console2 = d.join("console2");

    let mut vm = start_builtin_vm(d, &[], &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(3, TICKS);
    let seen_before = last_tick(&read_console(&console));
    let report = ctl_ok(&vm.api, &["snapshot", s(&snap)]);
    let seen_after = last_tick(&read_console(&console));
    eprintln!("snapshot blackout: {} ms", report["blackout_ms"]);
    assert_eq!(report["paused"], false, "{report}");
    assert_eq!(report["memory"]["copied"], true, "{report}");
    assert_eq!(report["memory"]["path"], "memory", "{report}");
    assert_eq!(report["memory"]["size"], 32u64 << 20, "{report}");
    assert_eq!(
        std::fs::metadata(snap.join("memory")).map(|m| m.len()).ok(),
        Some(32 << 20),
        "the snapshot did not write the guest memory out"
    );
    assert!(snap.join("memory.waterbear-saved").exists());
    // The original resumed and goes on.
    vm.wait_tick(seen_after + 3, TICKS);
    assert_eq!(ctl_ok(&vm.api, &["info"])["state"], "running");
    vm.shutdown();
    let original = read_console(&console);
    assert_consecutive_ok_ticks(&original);

    let serial = format!("file={}", s(&console2));
    let mut restored = restore(d, "restore", &snap, &["--serial", &serial]);
    restored.wait_api(BOOT);
    wait_until("6 ticks after the restore", TICKS, || {
        ticks(&read_console(&console2)).len() >= 6
    });
    restored.shutdown();

    let after = read_console(&console2);
    assert_eq!(
        banners(&after),
        0,
        "the restored guest booted again:\n{after}"
    );
    let numbers = assert_consecutive_ok_ticks(&after);
    let first = numbers[0];
    eprintln!(
        "snapshot taken between ticks {seen_before} and {seen_after}; restore went on at {first}"
    );
    assert!(
        first > seen_before && first <= seen_after + 1,
        "the restored guest went on at tick {first}, not right after the snapshot (taken \
         after tick {seen_before} was printed, answered by tick {seen_after})\n{after}"
    );
    // Same tick, same memory checksum as the original printed when it got there.
    let orig = tick_lines(&original);
    for (n, line) in tick_lines(&after) {
        if let Some(o) = orig.get(&n) {
            assert_eq!(
                &line, o,
                "tick {n} differs between the original and the restore"
            );
        }
    }
}

#[test]
fn three_generations_of_a_two_vcpu_vm_keep_cpuid_and_msr_lists_and_the_counter_going() {
    require_kvm!();
    three_generations(2);
}

#[test]
fn three_generations_of_a_one_vcpu_vm_keep_cpuid_and_msr_lists_and_the_counter_going() {
    require_kvm!();
    three_generations(1);
}

/// run -> snapshot g1 -> shutdown -> restore g1 -> snapshot g2 -> shutdown -> restore g2
/// -> snapshot g3, all on one memory file and one console.
fn three_generations(cpus: usize) {
    let dir = shm_tempdir();
    let d = dir.path();
    let mem = d.join("guest.mem");
    let console = d.join("console");

    let cpus_arg = cpus.to_string();
    let mut vm = start_builtin_vm(d, &["--cpus", &cpus_arg, "--memory-file", s(&mem)], &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(3, TICKS);
    let mut last_at_snapshot = Vec::new();
    for g in 1..=3 {
        let snap = d.join(format!("g{g}"));
        let report = ctl_ok(&vm.api, &["snapshot", s(&snap), "--keep-paused"]);
        eprintln!(
            "generation {g} snapshot blackout: {} ms",
            report["blackout_ms"]
        );
        vm.shutdown();
        let before = read_console(&console);
        last_at_snapshot.push(last_complete_tick(&before));
        if g == 3 {
            break;
        }
        vm = restore(d, &format!("restore{g}"), &snap, &[]);
        let info = vm.wait_api(BOOT);
        assert_eq!(info["vcpus"], cpus, "{info}");
        vm.wait_tick(last_complete_tick(&before) + 3, TICKS);
    }
    let all = read_console(&console);
    assert_eq!(banners(&all), 1, "a generation rebooted the guest:\n{all}");
    assert_consecutive_ok_ticks(&all);
    assert!(
        last_at_snapshot.windows(2).all(|w| w[0] < w[1]),
        "the tick counter did not increase across generations: {last_at_snapshot:?}"
    );

    let inspect = |g: u32| -> Value {
        let out = std::process::Command::new(common::waterbear())
            .args(["snapshot", "inspect"])
            .arg(d.join(format!("g{g}")))
            .output()
            .unwrap();
        assert!(out.status.success(), "inspect g{g}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let gens: Vec<Value> = (1..=3).map(inspect).collect();
    for (g, v) in gens.iter().enumerate() {
        assert_eq!(
            v["vcpus"].as_array().map(Vec::len),
            Some(cpus),
            "generation {}: {}",
            g + 1,
            v["vcpus"]
        );
    }
    for cpu in 0..cpus {
        for key in ["cpuid_crc32", "cpuid_entries", "msr_indices_crc32", "msrs"] {
            let values: Vec<&Value> = gens.iter().map(|v| &v["vcpus"][cpu][key]).collect();
            assert!(
                values[0].is_number() && values.iter().all(|v| *v == values[0]),
                "vCPU {cpu} {key} differs across generations g1, g2, g3: {values:?}"
            );
        }
    }
}

#[test]
fn three_live_updates_in_a_row_keep_the_pid_and_the_guest_running() {
    require_kvm!();
    let dir = shm_tempdir();
    let d = dir.path();
    let console = d.join("console");

    let mut vm = start_builtin_vm(d, &[], &[]);
    let info = vm.wait_api(BOOT);
    assert_eq!(info["pid"], vm.pid(), "{info}");
    assert_eq!(info["generation"], 0, "{info}");
    vm.wait_tick(3, TICKS);
    for g in 1..=3u64 {
        let before = last_tick(&read_console(&console));
        let (code, report, stderr) = ctl_update(&vm.api, None);
        assert_eq!(code, Some(0), "update {g}: {report} {stderr}");
        eprintln!("live update {g} blackout: {} ms", report["blackout_ms"]);
        assert_eq!(report["outcome"], "updated", "update {g}: {report}");
        assert_eq!(report["generation"], g, "update {g}: {report}");
        assert_eq!(report["error"], Value::Null, "update {g}: {report}");
        assert!(
            report["blackout_ms"].as_f64().is_some_and(|b| b > 0.0),
            "update {g}: no blackout measured: {report}"
        );
        let info = ctl_ok(&vm.api, &["info"]);
        assert_eq!(
            info["pid"],
            vm.pid(),
            "the pid changed in update {g}: {info}"
        );
        assert_eq!(info["generation"], g, "{info}");
        assert_eq!(info["state"], "running", "{info}");
        assert!(vm.try_exit().is_none(), "the VMM process exited");
        vm.wait_tick(before + 3, TICKS);
    }
    vm.shutdown();
    // The last process removes what the first created: the state directory is gone.
    assert!(
        !d.join("state").exists(),
        "the state directory outlived the VM after live updates: {:?}",
        common::tree(&d.join("state"))
    );
    common::assert_one_boot_with_ok_ticks(&console, "a live update rebooted the guest");
}

#[test]
fn a_live_update_of_a_two_vcpu_vm_keeps_the_guest_running() {
    require_kvm!();
    let dir = shm_tempdir();
    let d = dir.path();
    let console = d.join("console");

    let mut vm = start_builtin_vm(d, &["--cpus", "2"], &[]);
    let info = vm.wait_api(BOOT);
    vm.wait_tick(3, TICKS);
    let before = last_tick(&read_console(&console));
    // `ctl update` waits up to 60 s for a VMM that is gone; watch the VMM instead.
    let mut update = std::process::Command::new(common::waterbear())
        .args(["ctl", "--api-socket", s(&vm.api), "update"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut vmm_gone = None;
    wait_until("the update to finish or the VMM to exit", TICKS, || {
        vmm_gone = vm.try_exit();
        vmm_gone.is_some() || update.try_wait().unwrap().is_some()
    });
    if let Some(status) = vmm_gone {
        let _ = update.kill();
        let _ = update.wait();
        panic!(
            "the VMM exited ({status}) during the live update of a 2-vCPU VM; the guest is lost.\n\
             VMM stderr: {}\nconsole tail: {:?}",
            vm.stderr_text(),
            read_console(&console).lines().last()
        );
    }
    let out = update.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    eprintln!("2-vCPU live update blackout: {} ms", report["blackout_ms"]);
    assert_eq!(
        report["outcome"],
        "updated",
        "exit {:?}: {report} {}",
        out.status.code(),
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
    let now = ctl_ok(&vm.api, &["info"]);
    assert_eq!(now["pid"], info["pid"], "{now}");
    assert_eq!(now["vcpus"], 2, "{now}");
    vm.wait_tick(before + 5, TICKS);
    vm.shutdown();
    common::assert_one_boot_with_ok_ticks(&console, "the guest booted again");
}

#[test]
fn a_live_update_whose_restore_fails_falls_back_and_the_guest_keeps_ticking() {
    require_kvm!();
    let dir = shm_tempdir();
    let d = dir.path();
    let console = d.join("console");

    let env = [("WATERBEAR_TEST_FAIL_UPDATE_RESTORE", "1")];
    let mut vm = start_builtin_vm(d, &[], &env);
    vm.wait_api(BOOT);
    vm.wait_tick(3, TICKS);
    let before = last_tick(&read_console(&console));
    let (code, report, stderr) = ctl_update(&vm.api, None);
    eprintln!("fallback blackout: {} ms", report["blackout_ms"]);
    assert!(
        code.is_some_and(|c| c != 0),
        "ctl update exited {code:?} although the update fell back: {report}"
    );
    assert_eq!(report["outcome"], "fallback", "{report} {stderr}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("failure injected"),
        "the error does not name the injected failure: {report}"
    );
    let info = ctl_ok(&vm.api, &["info"]);
    assert_eq!(info["pid"], vm.pid(), "{info}");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["last_update"]["outcome"], "fallback", "{info}");
    vm.wait_tick(before + 5, TICKS);
    vm.shutdown();
    common::assert_one_boot_with_ok_ticks(&console, "the fallback rebooted the guest");
}

#[test]
fn live_update_refuses_missing_non_executable_and_foreign_binaries() {
    require_kvm!();
    let dir = shm_tempdir();
    let d = dir.path();
    let console = d.join("console");
    let missing = d.join("no-such-waterbear");
    let not_exec = d.join("waterbear-0644");
    std::fs::copy(common::waterbear(), &not_exec).unwrap();
    std::fs::set_permissions(
        &not_exec,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let foreign = Path::new("/bin/true");
    assert!(foreign.exists(), "this test needs /bin/true");

    let mut vm = start_builtin_vm(d, &[], &[]);
    let info = vm.wait_api(BOOT);
    vm.wait_tick(2, TICKS);
    for binary in [missing.as_path(), not_exec.as_path(), foreign] {
        let before = last_tick(&read_console(&console));
        let (code, out, stderr) = ctl_update(&vm.api, Some(binary));
        assert!(
            code.is_some_and(|c| c != 0),
            "update to {} was accepted: {code:?} {out}",
            binary.display()
        );
        assert!(
            stderr.contains(s(binary)),
            "the error does not name {}: {stderr}",
            binary.display()
        );
        let now = ctl_ok(&vm.api, &["info"]);
        assert_eq!(now["pid"], info["pid"], "{now}");
        assert_eq!(now["generation"], 0, "{now}");
        assert_eq!(now["state"], "running", "{now}");
        vm.wait_tick(before + 2, TICKS);
    }
    vm.shutdown();
    common::assert_one_boot_with_ok_ticks(&console, "the guest booted again");
}

fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Puts `/proc/sys/vm/nr_hugepages` back to what it was.
struct HugepageReservation {
    old: u64,
}

impl HugepageReservation {
    /// Makes `pages` default-size huge pages free, or says why it cannot.
    fn reserve(pages: u64) -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root to reserve huge pages".into());
        }
        if meminfo("Hugepagesize") != Some(2048) {
            return Err("the default huge page size is not 2 MiB".into());
        }
        let old: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .map_err(|e| format!("cannot read {NR_HUGEPAGES}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("cannot parse {NR_HUGEPAGES}: {e}"))?;
        let guard = HugepageReservation { old };
        let free = meminfo("HugePages_Free").unwrap_or(0);
        if free < pages {
            std::fs::write(NR_HUGEPAGES, (old + pages - free).to_string())
                .map_err(|e| format!("cannot write {NR_HUGEPAGES}: {e}"))?;
        }
        let free = meminfo("HugePages_Free").unwrap_or(0);
        if free < pages {
            return Err(format!(
                "only {free} of {pages} huge pages could be reserved"
            ));
        }
        Ok(guard)
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.old.to_string());
    }
}

fn hugepages_in_use() -> u64 {
    meminfo("HugePages_Total").unwrap_or(0) - meminfo("HugePages_Free").unwrap_or(0)
}

#[test]
fn hugepage_memfd_memory_survives_a_live_update() {
    require_kvm!();
    let _reservation = match HugepageReservation::reserve(32) {
        Ok(r) => r,
        Err(why) => {
            eprintln!("SKIPPED hugepage_memfd_memory_survives_a_live_update: {why}");
            return;
        }
    };
    let dir = shm_tempdir();
    let d = dir.path();
    let console = d.join("console");

    let mut vm = start_builtin_vm(
        d,
        &["--memory-backend", "hugepages", "--memory", "64M"],
        &[],
    );
    let info = vm.wait_api(BOOT);
    assert_eq!(info["memory"]["backend"], "hugepages", "{info}");
    assert_eq!(info["memory"]["bytes"], 64u64 << 20, "{info}");
    vm.wait_tick(3, TICKS);
    let in_use = hugepages_in_use();
    assert!(in_use >= 1, "the guest's memory uses no huge page");

    let before = last_tick(&read_console(&console));
    let (code, report, stderr) = ctl_update(&vm.api, None);
    eprintln!(
        "hugepage live update blackout: {} ms",
        report["blackout_ms"]
    );
    assert_eq!(code, Some(0), "{report} {stderr}");
    assert_eq!(report["outcome"], "updated", "{report}");
    let now = ctl_ok(&vm.api, &["info"]);
    assert_eq!(now["pid"], info["pid"], "{now}");
    assert_eq!(now["memory"]["backend"], "hugepages", "{now}");
    assert_eq!(now["memory"]["bytes"], 64u64 << 20, "{now}");
    vm.wait_tick(before + 5, TICKS);
    assert_eq!(
        hugepages_in_use(),
        in_use,
        "huge pages in use changed across the update: the memory was not kept in place"
    );
    vm.shutdown();
    common::assert_one_boot_with_ok_ticks(&console, "the guest booted again");
}

#[test]
fn a_live_update_keeps_a_paused_vm_paused_and_works_after_a_snapshot_into_its_state_dir() {
    require_kvm!();
    let dir = common::shm_tempdir();
    let mem = dir.path().join("guest.mem");
    let mut vm =
        common::start_builtin_vm(dir.path(), &["--memory-file", mem.to_str().unwrap()], &[]);
    vm.wait_api(Duration::from_secs(30));
    vm.wait_tick(2, Duration::from_secs(30));

    // A snapshot kept in the VM's own state directory (as a host reset does) must not
    // stop a later live update.
    let state_dir = dir.path().join("state");
    common::ctl_ok(
        &vm.api,
        &["snapshot", state_dir.to_str().unwrap(), "--keep-paused"],
    );
    let before = common::last_tick(&common::read_console(&vm.console));
    let out = common::ctl(&vm.api, &["update"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{} {}",
        common::text(&out.stdout),
        common::text(&out.stderr)
    );
    let info = common::ctl_ok(&vm.api, &["info"]);
    assert_eq!(
        info["state"], "paused",
        "a paused VM must stay paused across an update: {info}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        common::last_tick(&common::read_console(&vm.console)) <= before + 1,
        "the guest ran while paused"
    );
    // The snapshot is still valid while the VM stays paused, and resuming consumes it.
    assert!(mem.with_file_name("guest.mem.waterbear-saved").exists());
    common::ctl_ok(&vm.api, &["resume"]);
    assert!(
        !mem.with_file_name("guest.mem.waterbear-saved").exists(),
        "resume must drop the marker"
    );
    vm.wait_tick(before + 3, Duration::from_secs(30));
    vm.shutdown();
}
