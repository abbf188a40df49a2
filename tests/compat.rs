//! What waterbear 0.1 saved (state format 1) stays readable: `snapshot inspect` of a
//! `vm.state` that the 0.1 binary wrote. The decoding itself and the format-1 hand-over
//! of a live update's fallback are unit-tested in `src/vmm/compat.rs`.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn inspect_reads_a_snapshot_of_waterbear_0_1() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1");
    let out = Command::new(common::waterbear())
        .args(["snapshot", "inspect"])
        .arg(dir.join("vm.state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["header"]["version"], 1, "{json}");
    assert_eq!(json["config"]["memory_bytes"], 32 << 20, "{json}");
    assert_eq!(json["config"]["disks"], serde_json::json!([]), "{json}");
    assert_eq!(json["devices"]["virtio"], serde_json::json!([]), "{json}");
}
