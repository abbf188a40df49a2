//! Reading what waterbear 0.1 wrote: state format 1, from before the virtio devices.
//!
//! A live update exists to move a running guest onto a newer waterbear, so the newer one
//! must read the older one's hand-over, and a saved VM must survive an upgrade of the
//! binary. Format 1 differs from format 2 only in what the devices added: the launch
//! configuration had no disks, network interfaces or discovery mode, and the device
//! state no virtio devices. The structures below are format 1's layout, frozen (bincode
//! encodes fields in order, without names); they convert into the current ones with no
//! devices. The vCPU, VM, memory, serial and i8042 states are the same in both formats.
//!
//! A hand-over from format 1 that the new binary cannot restore goes back to the old
//! binary in format 1, which is all that binary reads.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::{KernelSource, MemoryBackend, SerialMode, VirtioDiscovery, VmConfig};
use super::saved::{DevicesState, SavedMemory, VmSnapshot};
use super::state::{VcpuState, VmState};
use super::update::Handoff;
use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialDeviceState;
use crate::snapshot::{self, SnapshotError};

/// The format that has this layout.
pub const VERSION: u32 = 1;

#[derive(Clone, Serialize, Deserialize)]
struct VmConfigV1 {
    id: String,
    kernel: KernelSource,
    initrd: Option<PathBuf>,
    cmdline: String,
    cpus: u8,
    memory_bytes: u64,
    memory: MemoryBackend,
    serial: SerialMode,
    state_dir: PathBuf,
    api_socket: Option<PathBuf>,
}

#[derive(Clone, Serialize, Deserialize)]
struct DevicesStateV1 {
    serial: SerialDeviceState,
    i8042: I8042State,
}

#[derive(Clone, Serialize, Deserialize)]
struct VmSnapshotV1 {
    config: VmConfigV1,
    memory: SavedMemory,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    devices: DevicesStateV1,
    saved_unix_ms: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct HandoffV1 {
    snapshot: VmSnapshotV1,
    backend: MemoryBackend,
    memory_fd: RawFd,
    api_listener_fd: Option<RawFd>,
    fallback_exe_fd: RawFd,
    pause_started_ns: u64,
    generation: u64,
    binary: PathBuf,
    failure: Option<String>,
    terminal: Option<Vec<u8>>,
    log_level: String,
    log_file: Option<PathBuf>,
    paused: bool,
    snapshot_memory: Option<PathBuf>,
}

impl From<VmSnapshotV1> for VmSnapshot {
    fn from(s: VmSnapshotV1) -> Self {
        let c = s.config;
        VmSnapshot {
            config: VmConfig {
                id: c.id,
                kernel: c.kernel,
                initrd: c.initrd,
                cmdline: c.cmdline,
                cpus: c.cpus,
                memory_bytes: c.memory_bytes,
                memory: c.memory,
                serial: c.serial,
                state_dir: c.state_dir,
                api_socket: c.api_socket,
                disks: Vec::new(),
                nets: Vec::new(),
                virtio_discovery: VirtioDiscovery::Acpi,
            },
            memory: s.memory,
            vm: s.vm,
            vcpus: s.vcpus,
            devices: DevicesState {
                serial: s.devices.serial,
                i8042: s.devices.i8042,
                virtio: Vec::new(),
            },
            saved_unix_ms: s.saved_unix_ms,
        }
    }
}

/// Back to format 1, for a fallback to the binary that wrote it. Fails for a VM with
/// virtio devices, which format 1 cannot describe (no such VM comes from format 1).
fn snapshot_to_v1(s: &VmSnapshot) -> Option<VmSnapshotV1> {
    let c = &s.config;
    if !c.disks.is_empty() || !c.nets.is_empty() || !s.devices.virtio.is_empty() {
        return None;
    }
    Some(VmSnapshotV1 {
        config: VmConfigV1 {
            id: c.id.clone(),
            kernel: c.kernel.clone(),
            initrd: c.initrd.clone(),
            cmdline: c.cmdline.clone(),
            cpus: c.cpus,
            memory_bytes: c.memory_bytes,
            memory: c.memory.clone(),
            serial: c.serial.clone(),
            state_dir: c.state_dir.clone(),
            api_socket: c.api_socket.clone(),
        },
        memory: s.memory.clone(),
        vm: s.vm.clone(),
        vcpus: s.vcpus.clone(),
        devices: DevicesStateV1 {
            serial: s.devices.serial.clone(),
            i8042: s.devices.i8042.clone(),
        },
        saved_unix_ms: s.saved_unix_ms,
    })
}

/// Decodes a snapshot payload of format `version`.
pub fn decode_snapshot(
    path: &Path,
    version: u32,
    payload: &[u8],
) -> Result<VmSnapshot, SnapshotError> {
    if version == VERSION {
        let old: VmSnapshotV1 = snapshot::decode_payload(path, payload)?;
        return Ok(old.into());
    }
    snapshot::decode_payload(path, payload)
}

/// Decodes a hand-over payload of format `version`.
pub fn decode_handoff(path: &Path, version: u32, payload: &[u8]) -> Result<Handoff, SnapshotError> {
    if version != VERSION {
        return snapshot::decode_payload(path, payload);
    }
    let h: HandoffV1 = snapshot::decode_payload(path, payload)?;
    Ok(Handoff {
        snapshot: h.snapshot.into(),
        backend: h.backend,
        memory_fd: h.memory_fd,
        api_listener_fd: h.api_listener_fd,
        tap_fds: Vec::new(),
        disk_fds: Vec::new(),
        fallback_exe_fd: h.fallback_exe_fd,
        pause_started_ns: h.pause_started_ns,
        generation: h.generation,
        binary: h.binary,
        failure: h.failure,
        terminal: h.terminal,
        log_level: h.log_level,
        log_file: h.log_file,
        paused: h.paused,
        snapshot_memory: h.snapshot_memory,
        // 0.1 did not pass this on; its last process leaves the directory in place.
        state_dir_owned: (false, false),
        format_version: VERSION,
    })
}

/// Encodes a hand-over in the format it arrived in (`handoff.format_version`), so that
/// a fallback reaches the previous binary in a format it reads.
pub fn encode_handoff(handoff: &Handoff) -> Result<Vec<u8>, SnapshotError> {
    if handoff.format_version != VERSION {
        return Ok(snapshot::encode_frame(handoff)?.1);
    }
    let snapshot = snapshot_to_v1(&handoff.snapshot).ok_or_else(|| {
        SnapshotError::Encode("a VM with virtio devices cannot be handed to format 1".into())
    })?;
    let old = HandoffV1 {
        snapshot,
        backend: handoff.backend.clone(),
        memory_fd: handoff.memory_fd,
        api_listener_fd: handoff.api_listener_fd,
        fallback_exe_fd: handoff.fallback_exe_fd,
        pause_started_ns: handoff.pause_started_ns,
        generation: handoff.generation,
        binary: handoff.binary.clone(),
        failure: handoff.failure.clone(),
        terminal: handoff.terminal.clone(),
        log_level: handoff.log_level.clone(),
        log_file: handoff.log_file.clone(),
        paused: handoff.paused,
        snapshot_memory: handoff.snapshot_memory.clone(),
    };
    Ok(snapshot::encode_frame_as(&old, VERSION)?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vm.state` as waterbear 0.1 (commit 1747174) wrote it for a built-in guest of
    /// 32 MiB on a memfd: the real format 1, not a re-creation of it.
    fn fixture() -> (PathBuf, Vec<u8>, u32) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1/vm.state");
        let (header, payload) = snapshot::read_file(&path).unwrap();
        (path, payload, header.version)
    }

    #[test]
    fn a_format_1_snapshot_decodes_with_no_devices() {
        let (path, payload, version) = fixture();
        assert_eq!(version, 1);
        let snap = decode_snapshot(&path, version, &payload).unwrap();
        assert_eq!(snap.config.memory_bytes, 32 << 20);
        assert_eq!(snap.config.kernel, KernelSource::Builtin);
        assert!(snap.config.disks.is_empty() && snap.config.nets.is_empty());
        assert!(snap.devices.virtio.is_empty());
        assert_eq!(snap.vcpus.len(), 1);
        // The format 2 layout does not fit these bytes.
        assert!(snapshot::decode_payload::<VmSnapshot>(&path, &payload).is_err());
    }

    fn handoff(snap: VmSnapshot, format_version: u32) -> Handoff {
        Handoff {
            snapshot: snap,
            backend: MemoryBackend::Memfd,
            memory_fd: 7,
            api_listener_fd: Some(8),
            tap_fds: Vec::new(),
            disk_fds: Vec::new(),
            fallback_exe_fd: 9,
            pause_started_ns: 123,
            generation: 4,
            binary: "/usr/bin/waterbear".into(),
            failure: Some("the new binary failed".into()),
            terminal: None,
            log_level: "info".into(),
            log_file: None,
            paused: false,
            snapshot_memory: None,
            state_dir_owned: (true, true),
            format_version,
        }
    }

    #[test]
    fn a_fallback_hands_a_format_1_hand_over_back_in_format_1() {
        let (path, payload, version) = fixture();
        let snap = decode_snapshot(&path, version, &payload).unwrap();
        let bytes = encode_handoff(&handoff(snap, VERSION)).unwrap();
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            VERSION
        );
        // What the 0.1 binary decodes: its own layout, nothing left over.
        let old: HandoffV1 = snapshot::decode_payload(&path, &bytes[32..]).unwrap();
        assert_eq!(old.generation, 4);
        assert_eq!(old.failure.as_deref(), Some("the new binary failed"));
        let back = decode_handoff(&path, VERSION, &bytes[32..]).unwrap();
        assert_eq!(back.memory_fd, 7);
        assert_eq!(back.api_listener_fd, Some(8));
        assert_eq!(back.format_version, VERSION);
        assert_eq!(
            back.snapshot.config,
            decode_snapshot(&path, version, &payload).unwrap().config
        );
    }

    #[test]
    fn a_current_hand_over_stays_in_the_current_format() {
        let (path, payload, version) = fixture();
        let snap = decode_snapshot(&path, version, &payload).unwrap();
        let bytes = encode_handoff(&handoff(snap, snapshot::FORMAT_VERSION)).unwrap();
        let v = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        assert_eq!(v, snapshot::FORMAT_VERSION);
        let back = decode_handoff(&path, v, &bytes[32..]).unwrap();
        assert_eq!(back.format_version, snapshot::FORMAT_VERSION);
        assert_eq!(back.generation, 4);
    }

    #[test]
    fn a_vm_with_devices_cannot_go_back_to_format_1() {
        let (path, payload, version) = fixture();
        let mut snap = decode_snapshot(&path, version, &payload).unwrap();
        snap.config
            .disks
            .push(crate::devices::virtio::block::BlockConfig {
                path: "/d.img".into(),
                read_only: false,
                id: "disk0".into(),
            });
        assert!(encode_handoff(&handoff(snap, VERSION)).is_err());
    }
}
