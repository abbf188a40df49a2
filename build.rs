//! Builds the built-in test guest (resources/testguest) into a small static ELF that
//! the binary embeds. It needs only the machine's gcc and binutils.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from("resources/testguest");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("testguest.elf");
    for f in ["guest.c", "guest.h", "virtio_blk.c", "start.S", "link.ld"] {
        println!("cargo:rerun-if-changed={}", src.join(f).display());
    }
    let cc = std::env::var("WATERBEAR_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let status = Command::new(&cc)
        .args([
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-nostdlib",
            "-static",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-fno-stack-protector",
            "-fcf-protection=none",
            "-fno-asynchronous-unwind-tables",
            "-Os",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,--build-id=none",
            "-Wl,--no-warn-rwx-segments",
            "-s",
        ])
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .arg("-o")
        .arg(&out)
        .arg(src.join("guest.c"))
        .arg(src.join("virtio_blk.c"))
        .arg(src.join("start.S"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("building the test guest with {cc} failed ({s})"),
        Err(e) => panic!("cannot run {cc} to build the test guest ({e}); install gcc"),
    }
}
