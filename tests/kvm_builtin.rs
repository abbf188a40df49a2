//! KVM tests with the built-in test guest: they need `/dev/kvm` (software KVM is
//! enough) and skip with a printed reason without it.

mod common;

use common::{run_vm, text, ticks, tree};

#[test]
fn builtin_guest_ticks_and_exits_zero_after_requested_ticks() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("vm");
    let out = run_vm(
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--cmdline",
            "ticks=4 tick_ms=50",
        ],
        60,
    );
    let console = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        console.contains("waterbear test guest"),
        "no banner in {console:?}"
    );
    let t = ticks(&console);
    assert_eq!(
        t.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4],
        "{console}"
    );
    assert!(t.iter().all(|x| x.1), "a memory checksum failed: {console}");
    assert!(
        !state.exists(),
        "the state directory outlived a clean exit: {:?}",
        tree(&state)
    );
}

#[test]
fn builtin_guest_boots_with_four_vcpus() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("vm");
    let out = run_vm(
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--cpus",
            "4",
            "--cmdline",
            "ticks=2",
        ],
        60,
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(ticks(&text(&out.stdout)).len(), 2);
}

#[test]
fn serial_output_goes_to_a_file() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let serial = format!("file={}", console.display());
    let state = dir.path().join("vm");
    let out = run_vm(
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--serial",
            &serial,
            "--cmdline",
            "ticks=2",
        ],
        60,
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "console leaked to stdout");
    let logged = std::fs::read_to_string(&console).unwrap();
    assert_eq!(ticks(&logged).len(), 2, "{logged}");
}

#[test]
fn file_backed_memory_keeps_guest_ram_after_exit() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("guest.mem");
    let state = dir.path().join("vm");
    let out = run_vm(
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--memory",
            "32M",
            "--memory-file",
            mem.to_str().unwrap(),
            "--cmdline",
            "ticks=2",
        ],
        60,
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let bytes = std::fs::read(&mem).unwrap();
    assert_eq!(bytes.len(), 32 << 20);
    // The guest image is loaded at 1 MiB: its first loadable segment's bytes are there.
    let elf = waterbear::vmm::boot::builtin::TEST_GUEST_ELF;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let phoff = u64_at(32);
    let load = (0..8usize)
        .map(|i| phoff + i * 56)
        .find(|&ph| u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) == 1)
        .expect("a PT_LOAD segment");
    let (offset, paddr) = (u64_at(load + 8), u64_at(load + 24));
    assert_eq!(&bytes[paddr..paddr + 16], &elf[offset..offset + 16]);
}

#[test]
fn serial_input_reaches_the_guest_uart_without_stalling_it() {
    require_kvm!();
    // The built-in guest does not read its UART; feeding it more than the 64-byte FIFO
    // must neither block the VMM nor stop the guest's ticks.
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("vm");
    let mut child = Command::new(common::waterbear())
        .args([
            "run",
            "--state-dir",
            state.to_str().unwrap(),
            "--cmdline",
            "ticks=3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(&[b'x'; 4096]);
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(ticks(&text(&out.stdout)).len(), 3);
}

#[test]
fn sigterm_stops_the_vm_and_cleans_the_state_directory() {
    require_kvm!();
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("vm");
    let child = Command::new(common::waterbear())
        .args(["run", "--state-dir", state.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !state.join("config.json").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        state.join("config.json").exists(),
        "the VM never wrote its config"
    );
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(!state.exists());
}
