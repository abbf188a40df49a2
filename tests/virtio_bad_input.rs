//! Bad `--disk`, `--net` and `--virtio-discovery` input to `waterbear run`, and restores
//! whose disks or taps are not what the snapshot was taken with. Each refusal must exit 1
//! with an error naming the input and leave every file under the test's directory as it
//! was, the disk images byte for byte (and, for a restore, the snapshot directory and
//! memory file).
//!
//! Option syntax is checked before KVM is touched, so those tests run anywhere; opening
//! disks and taps happens while the VM is built and needs `/dev/kvm`. Every test that uses
//! a tap runs in a private network namespace of its own thread (see
//! `common::in_private_netns`), never in the host's, and is skipped with a printed
//! `SKIPPED: <reason>` without root or `ip`.
//!
//! Restores whose disks or taps changed are in `virtio_restore_bad_input.rs`.

mod common;
mod virtio_support;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::{
    add_tap, in_private_netns, ip, shm_tempdir, skip, start_builtin_vm, text, tree_with_bytes,
};
use virtio_support::*;

// ---- Option syntax and the checks across devices: no KVM needed. ----

#[test]
fn malformed_disk_options_are_refused() {
    let d = shm_tempdir();
    let disk = d.path().join("disk.img");
    make_disk(&disk, 1 << 20);
    let p = s(&disk);
    let cases: Vec<(String, Vec<String>)> = vec![
        ("readonly=on".into(), vec!["path=FILE is required".into()]),
        ("id=data".into(), vec!["path=FILE is required".into()]),
        (p.into(), vec!["not key=value".into()]),
        ("path=".into(), vec!["'path' has no value".into()]),
        ("".into(), vec!["not key=value".into()]),
        (
            format!("path={p},size=4G"),
            vec!["unknown key 'size'".into()],
        ),
        (
            format!("path={p},readonly=maybe"),
            vec!["maybe".into(), "on or off".into()],
        ),
        (
            format!("path={p},readonly=ON"),
            vec!["'ON'".into(), "on or off".into()],
        ),
        (
            format!("path={p},id=abcdefghijklmnopqrstu"),
            vec!["abcdefghijklmnopqrstu".into(), "1 to 20".into()],
        ),
        (
            format!("path={p},id=has space"),
            vec!["has space".into(), "1 to 20".into()],
        ),
        (format!("path={p},id=disk\u{e9}"), vec!["1 to 20".into()]),
        (format!("path={p},id="), vec!["'id' has no value".into()]),
        (
            format!("path={p},path={p}"),
            vec!["'path' is given twice".into()],
        ),
        (
            format!("path={p},id=a,id=b"),
            vec!["'id' is given twice".into()],
        ),
        (
            format!("path={p},readonly=on,readonly=off"),
            vec!["'readonly' is given twice".into()],
        ),
        (format!("path={p},"), vec!["not key=value".into()]),
    ];
    for (spec, needles) in &cases {
        let mut all: Vec<&str> = vec!["--disk"];
        all.extend(needles.iter().map(String::as_str));
        expect_refused(d.path(), &["--disk", spec], &all);
    }
}

#[test]
fn the_same_disk_id_twice_is_refused() {
    let d = shm_tempdir();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    make_disk(&a, 1 << 20);
    make_disk(&b, 1 << 20);
    expect_refused(
        d.path(),
        &[
            "--disk",
            &format!("path={},id=data", s(&a)),
            "--disk",
            &format!("path={},id=data", s(&b)),
        ],
        &["disk id 'data' is used twice"],
    );
    // The default ids are disk0, disk1, ... by position: an explicit one may collide.
    expect_refused(
        d.path(),
        &[
            "--disk",
            &format!("path={}", s(&a)),
            "--disk",
            &format!("path={},id=disk0", s(&b)),
        ],
        &["disk id 'disk0' is used twice"],
    );
}

#[test]
fn the_same_disk_path_twice_is_refused() {
    let d = shm_tempdir();
    let a = d.path().join("a.img");
    make_disk(&a, 1 << 20);
    expect_refused(
        d.path(),
        &[
            "--disk",
            &format!("path={}", s(&a)),
            "--disk",
            &format!("path={},readonly=on,id=again", s(&a)),
        ],
        &["disk file", s(&a), "used twice"],
    );
}

#[test]
fn more_devices_than_interrupt_lines_are_refused() {
    let d = shm_tempdir();
    let mut specs = Vec::new();
    for i in 0..17 {
        let p = d.path().join(format!("d{i}.img"));
        make_disk(&p, 4096);
        specs.push(format!("path={}", s(&p)));
    }
    let args = |n: usize, discovery: &str| -> Vec<String> {
        let mut a = vec!["--virtio-discovery".to_string(), discovery.to_string()];
        for spec in &specs[..n] {
            a.extend(["--disk".to_string(), spec.clone()]);
        }
        a
    };
    let nine = args(9, "cmdline");
    let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
    expect_refused(d.path(), &nine, &["9 virtio devices", "at most 8"]);
    let seventeen = args(17, "acpi");
    let seventeen: Vec<&str> = seventeen.iter().map(String::as_str).collect();
    expect_refused(d.path(), &seventeen, &["17 virtio devices", "at most 16"]);
    // acpi is the default.
    let default: Vec<&str> = seventeen[2..].to_vec();
    expect_refused(d.path(), &default, &["17 virtio devices", "at most 16"]);
}

#[test]
fn exactly_as_many_devices_as_interrupt_lines_run() {
    require_kvm!();
    let d = shm_tempdir();
    let mut specs = Vec::new();
    let mut images = Vec::new();
    for i in 0..16 {
        let p = d.path().join(format!("d{i}.img"));
        make_disk(&p, 4096);
        specs.push(format!("path={}", s(&p)));
        images.push(p);
    }
    for (n, discovery) in [(8, "cmdline"), (16, "acpi")] {
        let mut a = vec!["--virtio-discovery".to_string(), discovery.to_string()];
        for spec in &specs[..n] {
            a.extend(["--disk".to_string(), spec.clone()]);
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        expect_runs(d.path(), &a);
    }
    // The guest never touched them.
    for (i, p) in images.iter().enumerate() {
        let mut want = vec![0u8; 4096];
        for (j, b) in want.iter_mut().enumerate() {
            *b = (j * 7 + j / 4096) as u8;
        }
        assert!(std::fs::read(p).unwrap() == want, "disk {i} changed");
    }
}

#[test]
fn a_bad_virtio_discovery_value_is_refused() {
    let d = shm_tempdir();
    for bad in ["pci", "ACPI", "", "acpi,cmdline"] {
        expect_refused(
            d.path(),
            &["--virtio-discovery", bad],
            &["--virtio-discovery", &format!("'{bad}'")],
        );
    }
}

#[test]
fn malformed_macs_are_refused() {
    // Refused while the options are parsed, before any tap is looked at; in a private
    // namespace all the same when there can be one, so that nothing could reach the
    // host's interfaces even if that changed.
    let body = || {
        let d = shm_tempdir();
        for (mac, needle) in [
            ("52:54:00:12:34", "not a MAC address"),
            ("52:54:00:12:34:56:78", "not a MAC address"),
            ("zz:54:00:12:34:56", "not a MAC address"),
            ("52-54-00-12-34-56", "not a MAC address"),
            ("5254.0012.3456", "not a MAC address"),
            ("01:00:5e:00:00:01", "multicast"),
            ("33:33:00:00:00:01", "multicast"),
            ("ff:ff:ff:ff:ff:ff", "multicast"),
            ("00:00:00:00:00:00", "all zeros"),
        ] {
            expect_refused(
                d.path(),
                &["--net", &format!("tap=wbmac0,mac={mac}")],
                &["--net", mac, needle],
            );
        }
        expect_refused(
            d.path(),
            &["--net", "mac=52:54:00:12:34:56"],
            &["--net", "tap=NAME is required"],
        );
        expect_refused(
            d.path(),
            &["--net", "tap=wbmac0,queues=2"],
            &["--net", "unknown key 'queues'"],
        );
        expect_refused(
            d.path(),
            &["--net", "tap=wbmac0,tap=wbmac1"],
            &["--net", "'tap' is given twice"],
        );
    };
    if let Err(reason) = in_private_netns(body) {
        skip(&format!(
            "malformed_macs_are_refused: no private network namespace ({reason}); \
             running in this one (the options are refused before any tap is opened)"
        ));
        body();
    }
}

#[test]
fn the_same_tap_or_mac_twice_is_refused() {
    let body = || {
        let d = shm_tempdir();
        expect_refused(
            d.path(),
            &["--net", "tap=wbdup0", "--net", "tap=wbdup0"],
            &["tap 'wbdup0' is used twice"],
        );
        expect_refused(
            d.path(),
            &[
                "--net",
                "tap=wbdup0,mac=52:54:00:12:34:56",
                "--net",
                "tap=wbdup1,mac=52:54:00:12:34:56",
            ],
            &["MAC address '52:54:00:12:34:56' is used twice"],
        );
        // Cmdline discovery has 8 lines: network interfaces count with the disks.
        let disk = d.path().join("d.img");
        make_disk(&disk, 4096);
        let mut a: Vec<String> = vec!["--virtio-discovery".into(), "cmdline".into()];
        for i in 0..8 {
            a.extend(["--net".into(), format!("tap=wbn{i}")]);
        }
        a.extend(["--disk".into(), format!("path={}", s(&disk))]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        expect_refused(d.path(), &a, &["9 virtio devices", "at most 8"]);
    };
    if let Err(reason) = in_private_netns(body) {
        skip(&format!(
            "the_same_tap_or_mac_twice_is_refused: no private network namespace ({reason}); \
             running in this one (the options are refused before any tap is opened)"
        ));
        body();
    }
}

// ---- Disks and taps that cannot be opened: the VM is being built, KVM needed. ----

#[test]
fn a_missing_disk_file_is_refused() {
    require_kvm!();
    let d = shm_tempdir();
    let good = d.path().join("good.img");
    make_disk(&good, 1 << 20);
    let missing = d.path().join("missing.img");
    expect_refused(
        d.path(),
        &["--disk", &format!("path={}", s(&missing))],
        &[s(&missing), "No such file"],
    );
    // The second disk is missing: the first must not be left changed or locked.
    expect_refused(
        d.path(),
        &[
            "--disk",
            &format!("path={}", s(&good)),
            "--disk",
            &format!("path={},readonly=on", s(&missing)),
        ],
        &[s(&missing)],
    );
    // A dangling symlink is a missing file too.
    let link = d.path().join("dangling.img");
    std::os::unix::fs::symlink(&missing, &link).unwrap();
    expect_refused(
        d.path(),
        &["--disk", &format!("path={}", s(&link))],
        &[s(&link)],
    );
    expect_runs(d.path(), &["--disk", &format!("path={}", s(&good))]);
}

#[test]
fn a_relative_missing_disk_is_named_by_its_absolute_path() {
    require_kvm!();
    let d = shm_tempdir();
    let before = tree_with_bytes(d.path());
    let out = Command::new("timeout")
        .args(["-k", "3", "30"])
        .arg(common::waterbear())
        .args(run_args(d.path(), &["--disk", "path=rel/missing.img"]))
        .current_dir(d.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let abs = d.path().join("rel/missing.img");
    assert!(stderr.contains(s(&abs)), "does not name {abs:?}: {stderr}");
    assert_unchanged(d.path(), &before, "a relative missing disk");
}

#[test]
fn a_disk_path_that_is_a_directory_or_not_a_file_is_refused() {
    require_kvm!();
    let d = shm_tempdir();
    let dir = d.path().join("adir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("inside"), b"keep").unwrap();
    for opts in ["", ",readonly=on"] {
        expect_refused(
            d.path(),
            &["--disk", &format!("path={}{opts}", s(&dir))],
            &[s(&dir)],
        );
        expect_refused(
            d.path(),
            &["--disk", &format!("path=/dev/null{opts}")],
            &["/dev/null", "neither a regular file nor a block device"],
        );
    }
}

#[test]
fn a_fifo_as_disk_is_refused_without_hanging() {
    require_kvm!();
    let d = shm_tempdir();
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that lives through the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for opts in ["", ",readonly=on"] {
        let before = tree_with_bytes(d.path());
        let started = Instant::now();
        let args = run_args(d.path(), &["--disk", &format!("path={}{opts}", s(&fifo))]);
        // Nothing ever writes to the FIFO: a VMM that opens it read-only and waits for a
        // writer hangs; give it 10 s, then SIGTERM, then SIGKILL.
        let (code, stderr) = run_bounded(&args, 10);
        assert_eq!(
            code,
            Some(1),
            "path=FIFO{opts}: not refused (exit {code:?} after {:?}; 124, 137 or None: \
             it hung and was killed): {stderr}",
            started.elapsed()
        );
        assert!(
            stderr.contains(s(&fifo)),
            "path=FIFO{opts}: does not name it: {stderr}"
        );
        assert_unchanged(d.path(), &before, &format!("a FIFO disk{opts}"));
    }
}

#[test]
fn the_same_disk_file_by_another_name_is_refused() {
    require_kvm!();
    let d = shm_tempdir();
    let a = d.path().join("a.img");
    make_disk(&a, 1 << 20);
    let sym = d.path().join("sym.img");
    std::os::unix::fs::symlink(&a, &sym).unwrap();
    let hard = d.path().join("hard.img");
    std::fs::hard_link(&a, &hard).unwrap();
    let dotdot = d.path().join("sub/../a.img");
    std::fs::create_dir(d.path().join("sub")).unwrap();
    for (other, opts) in [
        (&sym, ""),
        (&hard, ""),
        (&dotdot, ""),
        (&sym, ",readonly=on"),
    ] {
        expect_refused(
            d.path(),
            &[
                "--disk",
                &format!("path={}", s(&a)),
                "--disk",
                &format!("path={}{opts}", s(other)),
            ],
            &[s(other), "same file"],
        );
    }
}

#[test]
fn a_disk_smaller_than_one_sector_is_refused() {
    require_kvm!();
    let d = shm_tempdir();
    for (name, len) in [("empty.img", 0usize), ("tiny.img", 100)] {
        let disk = d.path().join(name);
        make_disk(&disk, len);
        expect_refused(
            d.path(),
            &["--disk", &format!("path={}", s(&disk))],
            &[s(&disk), "smaller than one 512-byte sector"],
        );
    }
    let one = d.path().join("one-sector.img");
    make_disk(&one, 512);
    expect_runs(d.path(), &["--disk", &format!("path={}", s(&one))]);
}

#[test]
fn a_disk_in_use_by_another_vm_is_refused_unless_both_are_read_only() {
    require_kvm!();
    let other = shm_tempdir();
    let d = shm_tempdir();
    let disk = d.path().join("shared.img");
    make_disk(&disk, 1 << 20);
    for (first, second, refused) in [
        ("", "", true),
        ("", ",readonly=on", true),
        (",readonly=on", "", true),
        (",readonly=on", ",readonly=on", false),
    ] {
        let mut vm = start_builtin_vm(
            other.path(),
            &["--disk", &format!("path={}{first}", s(&disk))],
            &[],
        );
        vm.wait_api(BOOT);
        let args = ["--disk", &format!("path={}{second},id=again", s(&disk))];
        if refused {
            expect_refused(d.path(), &args, &[s(&disk), "in use"]);
        } else {
            expect_runs(d.path(), &args);
        }
        vm.shutdown();
        // With the first VM gone, its lock is gone.
        expect_runs(d.path(), &args);
    }
}

#[test]
fn taps_that_do_not_exist_or_are_not_taps_are_refused() {
    require_kvm!();
    with_netns("taps_that_do_not_exist_or_are_not_taps_are_refused", || {
        let d = shm_tempdir();
        let disk = d.path().join("d.img");
        make_disk(&disk, 1 << 20);
        let with_disk = |net: &str| -> Vec<String> {
            vec![
                "--disk".into(),
                format!("path={}", s(&disk)),
                "--net".into(),
                net.into(),
            ]
        };
        let refused = |net: &str, needles: &[&str]| {
            let a = with_disk(net);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            expect_refused(d.path(), &a, needles);
        };
        refused("tap=wbnone0", &["wbnone0", "does not exist"]);
        // 15 bytes is the longest interface name; it must still not be created.
        refused(
            "tap=wbabcdefghijklm",
            &["wbabcdefghijklm", "does not exist"],
        );
        refused("tap=wbabcdefghijklmn", &["wbabcdefghijklmn", "15 bytes"]);
        refused("tap= ", &["whitespace"]);
        refused("tap=wb tap", &["wb tap", "whitespace"]);
        refused("tap=wb%d", &["wb%d"]);
        refused("tap=..", &["\"..\"", "not valid"]);
        // No tap was created by any of that.
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        let links = text(&links.stdout);
        assert!(
            !links.contains("wb"),
            "a refused --net created an interface:\n{links}"
        );
        // Interfaces that exist but are not taps.
        ip(&["link", "set", "lo", "up"]);
        refused("tap=lo", &["lo", "not a tap"]);
        ip(&[
            "link", "add", "wbveth0", "type", "veth", "peer", "name", "wbveth1",
        ]);
        refused("tap=wbveth0", &["wbveth0", "not a tap"]);
        ip(&["link", "add", "wbbr0", "type", "bridge"]);
        refused("tap=wbbr0", &["wbbr0", "not a tap"]);
        ip(&["tuntap", "add", "dev", "wbtun0", "mode", "tun"]);
        refused("tap=wbtun0", &["wbtun0", "not a tap"]);
        ip(&[
            "tuntap",
            "add",
            "dev",
            "wbmq0",
            "mode",
            "tap",
            "multi_queue",
        ]);
        refused("tap=wbmq0", &["wbmq0", "not a tap"]);
        // The control: a real tap of that longest name runs.
        add_tap("wbabcdefghijklm");
        let a = with_disk("tap=wbabcdefghijklm");
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        expect_runs(d.path(), &a);
    });
}

#[test]
fn a_tap_open_in_another_vm_is_refused() {
    require_kvm!();
    with_netns("a_tap_open_in_another_vm_is_refused", || {
        add_tap("wbbusy0");
        let other = shm_tempdir();
        let d = shm_tempdir();
        let disk = d.path().join("d.img");
        make_disk(&disk, 1 << 20);
        let args = [
            "--disk",
            &format!("path={},readonly=on", s(&disk)),
            "--net",
            "tap=wbbusy0",
        ];
        let mut vm = start_builtin_vm(other.path(), &["--net", "tap=wbbusy0"], &[]);
        vm.wait_api(BOOT);
        expect_refused(d.path(), &args, &["wbbusy0", "busy"]);
        // Also with another MAC and at another position.
        expect_refused(
            d.path(),
            &[
                "--net",
                "tap=wbbusy1,mac=52:54:00:00:00:01",
                "--net",
                "tap=wbbusy0,mac=52:54:00:00:00:02",
            ],
            &["wbbusy"],
        );
        assert!(
            vm.try_exit().is_none(),
            "the VM holding the tap died: {}",
            vm.stderr_text()
        );
        vm.shutdown();
        expect_runs(d.path(), &args);
    });
}
