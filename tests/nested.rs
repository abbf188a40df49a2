//! Nested tests: each boots the test host VM under QEMU (`tools/testhost/run`) and runs
//! one scenario in it, with waterbear and a Linux guest inside.
//!
//! They take minutes each and need `qemu-system-x86_64`, so they run only when
//! `WATERBEAR_NESTED=1` (CI sets it). Otherwise, or with `WATERBEAR_SKIP_NESTED=1`, or
//! without QEMU, each test prints `SKIPPED: <reason>` straight to stderr (past the test
//! harness's output capture) and returns. The tests hold one lock so that only one
//! test host runs at a time.
//!
//! The binary under test is the one cargo built for this test run, passed to the
//! scripts as `WATERBEAR_BIN`; the guest artifacts and the test host image are built
//! by `tools/testhost/run` when missing.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

static ONE_TEST_HOST_AT_A_TIME: Mutex<()> = Mutex::new(());

fn skip_reason() -> Option<String> {
    if std::env::var("WATERBEAR_SKIP_NESTED").as_deref() == Ok("1") {
        return Some("WATERBEAR_SKIP_NESTED=1 is set".into());
    }
    if std::env::var("WATERBEAR_NESTED").as_deref() != Ok("1") {
        return Some("nested tests take minutes; set WATERBEAR_NESTED=1 to run them".into());
    }
    let qemu_found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join("qemu-system-x86_64").is_file())
        })
        .unwrap_or(false);
    if !qemu_found {
        return Some("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)".into());
    }
    None
}

/// Runs `tools/testhost/run <scenario>` and fails the test unless the scenario passed.
fn run_scenario(scenario: &str) {
    let _guard = ONE_TEST_HOST_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());

    if let Some(reason) = skip_reason() {
        // Written to the stderr handle, not with eprintln!, which the harness captures;
        // in one write so that the line stays whole between the harness's own output.
        let line = format!("SKIPPED: nested scenario {scenario} did not run: {reason}\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        return;
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/testhost/run");
    let run = || {
        Command::new(&script)
            .arg(scenario)
            .env("WATERBEAR_BIN", env!("CARGO_BIN_EXE_waterbear"))
            // A scenario takes seconds to a few minutes; a test host that says nothing
            // for this long has frozen.
            .env("TESTHOST_TIMEOUT", "420")
            .output()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", script.display()))
    };
    let mut output = run();
    // A test host that froze without a verdict (QEMU killed by its timeout) is run up to
    // twice more; a scenario that failed, once more. Both loudly, with the evidence of
    // the failed run: see docs/limitations.md for the intermittent failures this is for.
    // A second failure verdict is final.
    let mut failed_runs = 0;
    for _ in 0..2 {
        if output.status.success() {
            break;
        }
        let froze = String::from_utf8_lossy(&output.stderr).contains("no verdict");
        if !froze {
            failed_runs += 1;
            if failed_runs > 1 {
                break;
            }
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = format!(
            "RETRY: nested scenario {scenario}: {}; running it again \
             (docs/limitations.md). Last lines of the failed run:\n{}\n",
            if froze {
                "the test host froze without a verdict".to_string()
            } else {
                format!(
                    "it failed: {}",
                    stdout
                        .lines()
                        .find(|l| l.starts_with("WB-SCENARIO"))
                        .unwrap_or("no verdict line")
                )
            },
            last_lines(&stdout, 40)
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
        output = run();
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    for line in stdout.lines().filter(|line| line.starts_with("WB-METRIC")) {
        eprintln!("{scenario}: {line}");
    }
    assert!(
        output.status.success(),
        "nested scenario {scenario} failed ({}).\n--- last console lines ---\n{}\n--- run's \
         messages ---\n{stderr}",
        output.status,
        last_lines(&stdout, 60),
    );
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

#[test]
fn nested_builtin_guest_ticks_in_test_host() {
    run_scenario("builtin");
}

#[test]
fn nested_boot_project_kernel_two_vcpus() {
    run_scenario("boot");
}

#[test]
fn nested_boot_stock_cloud_kernel_two_vcpus() {
    run_scenario("boot-stock");
}

#[test]
fn nested_console_echoes_typed_command_and_reboots() {
    run_scenario("console");
}

#[test]
fn nested_restore_in_new_process_continues_linux_guest() {
    run_scenario("restore");
}

#[test]
fn nested_twenty_live_updates_keep_linux_guest_running() {
    run_scenario("live-update");
}

#[test]
fn nested_host_reset_restores_linux_guests_and_reports_corrupt_state() {
    run_scenario("host-reset");
}

#[test]
fn nested_five_host_resets_in_a_row_keep_linux_guests_running() {
    run_scenario("host-reset-soak");
}

#[test]
fn nested_recover_escalates_to_host_reset_and_guests_survive() {
    run_scenario("recover");
}

#[test]
fn nested_disk_ext4_data_disk_and_read_only_disk_cmdline_discovery() {
    run_scenario("disk");
}

#[test]
fn nested_net_ping_and_file_transfer_over_tap() {
    run_scenario("net");
}

#[test]
fn nested_disk_writes_acknowledged_survive_restore_live_update_and_host_reset() {
    run_scenario("disk-restore");
}

#[test]
fn nested_net_ping_across_live_updates_loses_few_packets() {
    run_scenario("net-update");
}

#[test]
fn nested_boot_stock_cloud_kernel_finds_virtio_disk_and_net_through_acpi() {
    run_scenario("boot-stock-virtio");
}
