//! virtio-blk I/O end to end on this machine's KVM: the built-in test guest's small
//! virtio-blk driver (`disk=1`, resources/testguest/virtio_blk.c) writes, flushes and reads
//! back one sector per tick through the MMIO register window, the queue notification
//! (ioeventfd) and the device interrupt (irqfd on GSI 5). Linux guests drive the devices
//! in the nested scenarios (`disk`, `net`, `disk-restore`, ...); these tests need no QEMU.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{ctl_ok, read_console, VmProcess};

const BOOT: Duration = Duration::from_secs(20);

/// One "disk N ..." line of the guest: the tick, the outcome word, the interrupt count.
#[derive(Debug)]
struct DiskLine {
    tick: u64,
    outcome: String,
    irqs: Option<u64>,
}

fn disk_lines(console: &str) -> Vec<DiskLine> {
    let complete = console.rfind('\n').map_or("", |end| &console[..=end]);
    complete
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            if w.next()? != "disk" {
                return None;
            }
            let tick = w.next()?.parse().ok()?;
            let outcome = w.next()?.to_string();
            let irqs = match w.next() {
                Some("irqs") => w.next().and_then(|n| n.parse().ok()),
                _ => None,
            };
            Some(DiskLine {
                tick,
                outcome,
                irqs,
            })
        })
        .collect()
}

/// The sector the guest writes at `tick`, as the guest fills it.
fn sector_of(tick: u64) -> Vec<u8> {
    (0..512u64).map(|i| (tick * 31 + i) as u8).collect()
}

struct Guest {
    dir: tempfile::TempDir,
    disk: PathBuf,
}

impl Guest {
    /// A directory with a 1 MiB disk image of zeros (2048 sectors).
    fn new() -> Self {
        let dir = common::shm_tempdir();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        Guest { dir, disk }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(&self, cmdline: &str, disk_opts: &str) -> VmProcess {
        let d = self.dir.path();
        let args = vec![
            "run".to_string(),
            "--state-dir".into(),
            s(&d.join("state")),
            "--api-socket".into(),
            s(&d.join("api.sock")),
            "--serial".into(),
            format!("file={}", s(&d.join("console"))),
            "--memory".into(),
            "32M".into(),
            "--cmdline".into(),
            cmdline.into(),
            "--disk".into(),
            format!("path={}{disk_opts}", s(&self.disk)),
        ];
        VmProcess::spawn(
            d,
            "run",
            &args,
            &[],
            &d.join("api.sock"),
            &d.join("console"),
        )
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Checks every "disk" line says ok, ticks consecutive from 1 to at least `min_tick`, and
/// the device's interrupts arrive: the count never goes back and ends at least at half
/// the ticks (three requests complete per tick, but edges that arrive while one is still
/// pending merge, and a completion seen before the guest halts needs no wake-up).
/// Returns the last tick.
fn check_disk_lines(console: &str, min_tick: u64) -> u64 {
    let lines = disk_lines(console);
    assert!(
        console.contains("disk capacity 2048 rw"),
        "the guest did not find a 2048-sector writable disk:\n{console}"
    );
    assert!(!lines.is_empty(), "no disk lines:\n{console}");
    let mut last_irqs = 0;
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(
            l.tick,
            i as u64 + 1,
            "disk lines not consecutive:\n{console}"
        );
        assert_eq!(l.outcome, "ok", "disk tick {} failed:\n{console}", l.tick);
        let irqs = l.irqs.expect("an ok line carries the interrupt count");
        assert!(
            irqs >= last_irqs,
            "interrupt count went back at disk tick {}:\n{console}",
            l.tick
        );
        last_irqs = irqs;
    }
    let last = lines.last().unwrap().tick;
    assert!(
        last_irqs >= last / 2,
        "{last_irqs} device interrupts in {last} disk ticks (irqfd not delivered?):\n{console}"
    );
    assert!(last >= min_tick, "only {last} disk ticks:\n{console}");
    last
}

/// Checks that the image holds each tick's sector for ticks 1..=last.
fn check_image(disk: &Path, last: u64) {
    let image = std::fs::read(disk).unwrap();
    for tick in 1..=last {
        let at = (tick as usize % 2048) * 512;
        assert!(
            image[at..at + 512] == sector_of(tick)[..],
            "sector {} does not hold tick {tick}'s data",
            tick % 2048
        );
    }
}

#[test]
fn guest_writes_flushes_and_reads_back_through_virtio_blk() {
    require_kvm!();
    let g = Guest::new();
    let mut vm = g.start("tick_ms=50 ticks=6 disk=1", "");
    let status = vm.wait_exit(BOOT);
    let console = read_console(&g.path("console"));
    assert_eq!(status.code(), Some(0), "{}\n{console}", vm.stderr_text());
    let last = check_disk_lines(&console, 6);
    check_image(&g.disk, last);
    // Nothing outside the sectors written changed.
    let image = std::fs::read(&g.disk).unwrap();
    assert!(image[..512].iter().all(|b| *b == 0));
    assert!(image[(last as usize + 1) * 512..].iter().all(|b| *b == 0));
}

#[test]
fn a_read_only_disk_refuses_the_guest_write_and_stays_unchanged() {
    require_kvm!();
    let g = Guest::new();
    let before = std::fs::read(&g.disk).unwrap();
    let mut vm = g.start("tick_ms=50 ticks=3 disk=1", ",readonly=on");
    let status = vm.wait_exit(BOOT);
    let console = read_console(&g.path("console"));
    assert_eq!(status.code(), Some(0), "{}\n{console}", vm.stderr_text());
    assert!(console.contains("disk capacity 2048 ro"), "{console}");
    let lines = disk_lines(&console);
    assert_eq!(lines.len(), 3, "{console}");
    assert!(
        lines.iter().all(|l| l.outcome == "RO"),
        "a write to the read-only disk did not fail with an I/O error:\n{console}"
    );
    assert_eq!(std::fs::read(&g.disk).unwrap(), before);
}

/// Waits until the guest has printed disk tick `n` (or later).
fn wait_disk_tick(vm: &mut VmProcess, console: &Path, n: u64) {
    common::wait_until(&format!("disk tick {n}"), BOOT, || {
        disk_lines(&read_console(console))
            .last()
            .is_some_and(|l| l.tick >= n)
    });
    assert!(vm.try_exit().is_none(), "{}", vm.stderr_text());
}

#[test]
fn disk_io_carries_on_across_live_update_and_snapshot_restore() {
    require_kvm!();
    let g = Guest::new();
    let console = g.path("console");
    let api = g.path("api.sock");
    let mut vm = g.start("tick_ms=50 disk=1", "");
    vm.wait_api(BOOT);
    wait_disk_tick(&mut vm, &console, 3);

    // The API shows the disk, started by the guest's driver.
    let info = ctl_ok(&api, &["info"]);
    let disk = &info["devices"][0];
    assert_eq!(disk["kind"], "disk", "{info}");
    assert_eq!(disk["driver"], "running", "{info}");
    assert_eq!(disk["capacity_sectors"], 2048, "{info}");
    assert_eq!(disk["gsi"], 5, "{info}");

    // Live update in the middle of the guest's I/O.
    let update = ctl_ok(&api, &["update"]);
    assert_eq!(update["outcome"], "updated", "{update}");
    let before = disk_lines(&read_console(&console)).last().unwrap().tick;
    wait_disk_tick(&mut vm, &console, before + 3);

    // Snapshot (the disk is synced), move to a new process, go on.
    let snap = g.path("snap");
    let report = ctl_ok(&api, &["snapshot", &s(&snap), "--keep-paused"]);
    assert_eq!(report["restorable"], true, "{report}");
    let inspect = std::process::Command::new(common::waterbear())
        .args(["snapshot", "inspect"])
        .arg(&snap)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let virtio = &json["devices"]["virtio"];
    let device = &virtio[0]["block"];
    assert_eq!(device["disk"]["capacity_sectors"], 2048, "{json}");
    // The driver had started the device: status ACK|DRIVER|FEATURES_OK|DRIVER_OK and
    // its queue's ring positions saved.
    assert_eq!(device["transport"]["status"], 15, "{json}");
    assert!(
        !device["transport"]["queues"][0]["indexes"].is_null(),
        "{json}"
    );
    vm.shutdown();
    let saved_console = read_console(&console);
    let last_before_restore = disk_lines(&saved_console).last().unwrap().tick;

    let restore_console = g.path("console2");
    let args = [
        "restore".to_string(),
        "--from".into(),
        s(&snap),
        "--serial".into(),
        format!("file={}", s(&restore_console)),
    ];
    let mut restored =
        VmProcess::spawn(g.dir.path(), "restore", &args, &[], &api, &restore_console);
    wait_disk_tick(&mut restored, &restore_console, last_before_restore + 3);
    restored.shutdown();

    // One run of disk lines across all three processes, every one ok.
    let joined = saved_console + &read_console(&restore_console);
    let last = check_disk_lines(&joined, last_before_restore + 3);
    check_image(&g.disk, last);
    assert!(!joined.contains("BAD"), "{joined}");
}

#[test]
fn a_snapshot_is_not_restorable_while_a_disk_file_is_renamed_away() {
    require_kvm!();
    let g = Guest::new();
    let api = g.path("api.sock");
    let mut vm = g.start("tick_ms=50 disk=1", "");
    vm.wait_api(BOOT);
    let away = g.path("moved.img");
    std::fs::rename(&g.disk, &away).unwrap();
    let report = ctl_ok(&api, &["snapshot", &s(&g.path("snap1")), "--keep-paused"]);
    assert_eq!(report["restorable"], false, "{report}");
    // Back in place (the VM kept the same file open): restorable again.
    std::fs::rename(&away, &g.disk).unwrap();
    let report = ctl_ok(&api, &["snapshot", &s(&g.path("snap2")), "--keep-paused"]);
    assert_eq!(report["restorable"], true, "{report}");
    vm.shutdown();
}
