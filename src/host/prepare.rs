//! Preparing a persistent-memory state root: format the pmem device with ext4 (4 KiB
//! blocks, which DAX needs) only when it holds no waterbear state, and mount it with
//! `-o dax`.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{device} does not exist or is not a block device")]
    NoDevice { device: PathBuf },
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
    #[error("cannot run {program}")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{mount} is mounted without DAX; guest memory there would not survive a host reset")]
    NotDax { mount: PathBuf },
}

fn run(program: &'static str, args: &[&str]) -> Result<String, PrepareError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| PrepareError::Spawn { program, source })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(PrepareError::Command {
            command: format!("{program} {}", args.join(" ")),
            output: text.trim().into(),
        });
    }
    Ok(text)
}

/// What is on the device already.
enum Found {
    /// Nothing mountable: safe to format.
    NoFilesystem,
    /// A filesystem, with this many entries under `vms/`.
    Filesystem(usize),
}

/// Mounts the device read-only on a scratch directory to see what it holds.
fn probe(device: &Path) -> Found {
    let scratch = std::env::temp_dir().join(format!("waterbear-probe-{}", std::process::id()));
    if std::fs::create_dir_all(&scratch).is_err() {
        return Found::NoFilesystem;
    }
    let (dev, mnt) = (device.to_string_lossy(), scratch.to_string_lossy());
    let found = match run("mount", &["-o", "ro", &dev, &mnt]) {
        Ok(_) => {
            let n = std::fs::read_dir(scratch.join("vms"))
                .map(|d| d.count())
                .unwrap_or(0);
            let _ = run("umount", &[&mnt]);
            Found::Filesystem(n)
        }
        Err(_) => Found::NoFilesystem,
    };
    let _ = std::fs::remove_dir(&scratch);
    found
}

/// Mounts `device` with DAX at `mount`, formatting it first only when it holds no
/// filesystem at all: a filesystem (waterbear's state or anything else) is never
/// formatted. Returns the state root (`mount/vms`).
pub fn prepare(device: &Path, mount: &Path) -> Result<PathBuf, PrepareError> {
    use std::os::unix::fs::FileTypeExt;
    let is_block = std::fs::metadata(device)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if !is_block {
        return Err(PrepareError::NoDevice {
            device: device.into(),
        });
    }
    let (dev, mnt) = (device.to_string_lossy(), mount.to_string_lossy());
    if !super::inventory::is_dax(mount) {
        match probe(device) {
            Found::NoFilesystem => {
                log::info!("{dev} holds no filesystem: formatting it with ext4");
                run("mkfs.ext4", &["-q", "-F", "-b", "4096", &dev])?;
            }
            Found::Filesystem(n) => {
                log::info!(
                    "{dev} holds a filesystem ({n} VM entries): mounting it without formatting"
                );
            }
        }
        std::fs::create_dir_all(mount).map_err(|source| PrepareError::Spawn {
            program: "mkdir",
            source,
        })?;
        run("mount", &["-o", "dax", &dev, &mnt])?;
    }
    if !super::inventory::is_dax(mount) {
        return Err(PrepareError::NotDax {
            mount: mount.into(),
        });
    }
    let root = mount.join("vms");
    std::fs::create_dir_all(&root).map_err(|source| PrepareError::Spawn {
        program: "mkdir",
        source,
    })?;
    Ok(root)
}
