//! What the virtio bad-input tests share: the built-in guest's run arguments, a run
//! with a time bound, and the "nothing on disk changed" check.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{self, in_private_netns, skip, text, tree_with_bytes};

pub const BOOT: Duration = Duration::from_secs(30);

pub fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// A disk image of `len` bytes that is not all zeros, so a write would show.
pub fn make_disk(path: &Path, len: usize) {
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(path, bytes).unwrap();
}

/// `waterbear run` of the built-in guest with everything in `dir`, stopping after one
/// tick (so that input that is wrongly accepted ends the run quickly with exit 0), then
/// `extra`.
pub fn run_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--state-dir",
        s(&dir.join("state")),
        "--api-socket",
        s(&dir.join("api.sock")),
        "--serial",
        "null",
        "--memory",
        "32M",
        "--cmdline",
        "ticks=1 tick_ms=10",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Runs waterbear with `args` and returns (exit code, stderr). SIGTERM after `secs`,
/// SIGKILL 3 s later (a process that ignores SIGTERM still ends).
pub fn run_bounded(args: &[String], secs: u64) -> (Option<i32>, String) {
    let out = Command::new("timeout")
        .args(["-k", "3", &secs.to_string()])
        .arg(common::waterbear())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .expect("run timeout + waterbear");
    (out.status.code(), text(&out.stderr))
}

/// Asserts that every file under `dir` is as in `before`, bytes included.
pub fn assert_unchanged(dir: &Path, before: &[(PathBuf, Option<Vec<u8>>)], what: &str) {
    let after = tree_with_bytes(dir);
    let paths =
        |t: &[(PathBuf, Option<Vec<u8>>)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(
        paths(&after),
        paths(before),
        "files appeared or vanished for {what}"
    );
    for ((path, a), (_, b)) in after.iter().zip(before) {
        assert!(a == b, "{} changed for {what}", path.display());
    }
}

/// `waterbear run` in `dir` with `extra` must exit 1 with every one of `needles` in its
/// error, and leave every file under `dir` unchanged.
pub fn expect_refused(dir: &Path, extra: &[&str], needles: &[&str]) {
    let before = tree_with_bytes(dir);
    let (code, stderr) = run_bounded(&run_args(dir, extra), 30);
    assert_eq!(
        code,
        Some(1),
        "{extra:?} was not refused as bad input (exit {code:?}): {stderr}"
    );
    assert!(
        stderr.starts_with("waterbear: error: "),
        "no error line for {extra:?}: {stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "the error for {extra:?} does not name {needle:?}: {stderr}"
        );
    }
    assert_unchanged(dir, &before, &format!("{extra:?}"));
}

/// `waterbear run` in `dir` with `extra` must run the built-in guest to its end (exit 0):
/// the control case showing that a refusal was for the reason the test gave.
pub fn expect_runs(dir: &Path, extra: &[&str]) {
    let (code, stderr) = run_bounded(&run_args(dir, extra), 30);
    assert_eq!(code, Some(0), "{extra:?} did not run: {stderr}");
}

/// Runs `f` in a private network namespace, or prints why it cannot and returns.
pub fn with_netns(test: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(reason) = in_private_netns(f) {
        skip(&format!("{test}: {reason}"));
    }
}
