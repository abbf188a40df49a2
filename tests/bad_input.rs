//! Bad input to `waterbear run`: each case must fail with a non-zero exit, an error
//! that names the input, and nothing changed on disk.

mod common;

use std::path::Path;

use common::{run_vm, text, tree};

/// Runs with `args`, expects failure naming `needle`, and checks `dir` is unchanged.
fn expect_refused(dir: &Path, args: &[&str], needle: &str) {
    let before = tree(dir);
    let before_bytes: Vec<_> = before.iter().map(|p| std::fs::read(p).ok()).collect();
    let out = run_vm(args, 30);
    let stderr = text(&out.stderr);
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "accepted {args:?}: status {:?}, stderr {stderr}",
        out.status
    );
    assert!(
        stderr.contains(needle),
        "error for {args:?} does not name {needle:?}: {stderr}"
    );
    assert_eq!(tree(dir), before, "files changed for {args:?}");
    let after_bytes: Vec<_> = before.iter().map(|p| std::fs::read(p).ok()).collect();
    assert!(
        after_bytes == before_bytes,
        "file contents changed for {args:?}"
    );
}

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Case {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
    fn state(&self) -> String {
        self.path("state")
    }
    fn write(&self, name: &str, bytes: &[u8]) -> String {
        std::fs::write(self.dir.path().join(name), bytes).unwrap();
        self.path(name)
    }
    /// A file that looks like an x86_64 ELF of `size` bytes (header only, zero rest).
    fn fake_elf(&self, name: &str, size: usize) -> String {
        let mut b = vec![0u8; size];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18] = 62;
        self.write(name, &b)
    }
}

#[test]
fn run_rejects_a_missing_kernel() {
    let c = Case::new();
    expect_refused(
        c.dir.path(),
        &[
            "--state-dir",
            &c.state(),
            "--kernel",
            "/nonexistent/vmlinux",
        ],
        "/nonexistent/vmlinux",
    );
}

#[test]
fn run_rejects_an_unreadable_kernel() {
    let c = Case::new();
    // A directory cannot be read as a kernel, even by root.
    std::fs::create_dir(c.dir.path().join("kdir")).unwrap();
    let k = c.path("kdir");
    expect_refused(
        c.dir.path(),
        &["--state-dir", &c.state(), "--kernel", &k],
        &k,
    );
}

#[test]
fn run_rejects_a_file_that_is_neither_elf_nor_bzimage() {
    let c = Case::new();
    let k = c.write("notakernel", b"#!/bin/sh\necho hi\n");
    expect_refused(
        c.dir.path(),
        &["--state-dir", &c.state(), "--kernel", &k],
        "neither an ELF",
    );
}

#[test]
fn run_rejects_a_kernel_larger_than_guest_memory() {
    let c = Case::new();
    let k = c.fake_elf("huge", 20 << 20);
    expect_refused(
        c.dir.path(),
        &["--state-dir", &c.state(), "--kernel", &k, "--memory", "16M"],
        "does not fit",
    );
}

#[test]
fn run_rejects_an_initrd_larger_than_guest_memory() {
    let c = Case::new();
    let i = c.write("initrd", &vec![1u8; 20 << 20]);
    expect_refused(
        c.dir.path(),
        &["--state-dir", &c.state(), "--initrd", &i, "--memory", "16M"],
        &i,
    );
}

#[test]
fn run_rejects_a_command_line_over_the_kernel_limit() {
    let c = Case::new();
    let k = c.fake_elf("vmlinux", 4096);
    // x86's limit is 2048 bytes including the NUL: 2047 characters fit, 2048 do not.
    let long = "a".repeat(2048);
    expect_refused(
        c.dir.path(),
        &[
            "--state-dir",
            &c.state(),
            "--kernel",
            &k,
            "--cmdline",
            &long,
        ],
        "2049 bytes",
    );
}

#[test]
fn run_rejects_zero_vcpus() {
    let c = Case::new();
    expect_refused(
        c.dir.path(),
        &["--state-dir", &c.state(), "--cpus", "0"],
        "--cpus",
    );
}

#[test]
fn run_rejects_too_many_vcpus() {
    let c = Case::new();
    expect_refused(
        c.dir.path(),
        &["--state-dir", &c.state(), "--cpus", "255"],
        "255 vCPUs",
    );
    expect_refused(
        c.dir.path(),
        &["--state-dir", &c.state(), "--cpus", "1000"],
        "--cpus",
    );
}

#[test]
fn run_rejects_hugepage_memory_that_is_not_a_whole_number_of_pages() {
    let c = Case::new();
    expect_refused(
        c.dir.path(),
        &[
            "--state-dir",
            &c.state(),
            "--memory-backend",
            "hugepages",
            "--memory",
            "513M",
        ],
        "not a multiple",
    );
}

#[test]
fn run_rejects_a_memory_file_of_another_size() {
    let c = Case::new();
    let m = c.write("guest.mem", &vec![7u8; 1 << 20]);
    expect_refused(
        c.dir.path(),
        &[
            "--state-dir",
            &c.state(),
            "--memory",
            "32M",
            "--memory-file",
            &m,
        ],
        &m,
    );
}

#[test]
fn run_rejects_a_memory_file_that_holds_a_saved_vm() {
    let c = Case::new();
    let m = c.write("guest.mem", &vec![7u8; 32 << 20]);
    c.write("guest.mem.waterbear-saved", b"{}");
    expect_refused(
        c.dir.path(),
        &[
            "--state-dir",
            &c.state(),
            "--memory",
            "32M",
            "--memory-file",
            &m,
        ],
        "saved VM",
    );
}

#[test]
fn run_rejects_malformed_sizes_ids_and_modes() {
    let c = Case::new();
    let s = c.state();
    expect_refused(c.dir.path(), &["--state-dir", &s, "--memory", "12Q"], "12Q");
    expect_refused(
        c.dir.path(),
        &["--state-dir", &s, "--serial", "tcp:1"],
        "tcp:1",
    );
    expect_refused(
        c.dir.path(),
        &["--state-dir", &s, "--memory-backend", "ram"],
        "ram",
    );
    expect_refused(c.dir.path(), &["--id", "../escape"], "../escape");
}

#[test]
fn run_without_permission_on_dev_kvm_says_so() {
    // Drop to an unprivileged user; needs root and setpriv.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("SKIPPED run_without_permission_on_dev_kvm_says_so: needs root and setpriv");
        return;
    }
    if common::kvm_unavailable().is_some() {
        eprintln!("SKIPPED run_without_permission_on_dev_kvm_says_so: no /dev/kvm here");
        return;
    }
    let c = Case::new();
    let mode = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap();
    if mode & 0o006 != 0 {
        eprintln!(
            "SKIPPED run_without_permission_on_dev_kvm_says_so: /dev/kvm is world-accessible"
        );
        return;
    }
    std::fs::set_permissions(
        c.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::waterbear())
        .args(["run", "--state-dir", &c.state()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/dev/kvm"), "{stderr}");
    assert!(!Path::new(&c.state()).exists());
}

#[test]
fn run_without_dev_kvm_says_so() {
    // Hide /dev/kvm in a private mount namespace; needs root and unshare.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/unshare").exists() {
        eprintln!("SKIPPED run_without_dev_kvm_says_so: needs root and unshare");
        return;
    }
    let c = Case::new();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --state-dir {} </proc/self/fd/0",
        common::waterbear().display(),
        c.state()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    if stderr.contains("unshare failed") || stderr.contains("mount:") {
        eprintln!("SKIPPED run_without_dev_kvm_says_so: cannot make a mount namespace: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/dev/kvm does not exist"), "{stderr}");
    assert!(!Path::new(&c.state()).exists());
}
