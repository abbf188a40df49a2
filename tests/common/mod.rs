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
    console
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
