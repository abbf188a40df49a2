//! The VM's virtio-mmio devices as the VMM wires them: one register window and one GSI per
//! device (disks first, then network interfaces, see [`virtio_slot`]), the interrupt as an
//! irqfd, each queue's notification as an ioeventfd, and the event-loop subscriber that
//! processes the queues.
//!
//! Queues are processed on the VMM's event-loop thread only: when a queue's ioeventfd
//! fires (the guest wrote QueueNotify) and, for a network device, when its tap becomes
//! readable. The vCPU threads only reach the register windows through the MMIO bus. While
//! the VM is paused nothing is processed, so guest memory and the device state hold still
//! for a snapshot; [`VirtioDevices::resume`] then processes every ready queue once and
//! raises each device's interrupt, so that a notification that arrived during the pause,
//! or before a snapshot that is being restored, is not lost.

mod events;
mod transport;

pub use events::QueueEvents;
pub use transport::{Transport, VirtioDeviceState};

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::config::VmConfig;
use super::layout::{virtio_slot, VIRTIO_MMIO_SIZE};
use crate::devices::bus::{lock, MmioBus};
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::mmio::{reg, RestoreError};
use crate::devices::virtio::net::NetError;
use crate::devices::virtio::{EventFdInterrupt, Memory};
use events::{Source, Watched};
use transport::{block_transport, driver_state, net_transport};

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("cannot restore {device}")]
    Restore {
        device: String,
        #[source]
        source: RestoreError,
    },
    #[error("the snapshot has {saved} virtio devices but its configuration names {configured}")]
    Count { saved: usize, configured: usize },
    #[error("saved device {index} is a {saved}, the configuration has a {configured} there")]
    Kind {
        index: usize,
        saved: &'static str,
        configured: &'static str,
    },
    #[error("cannot create an event for {device}")]
    EventFd {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register the {what} of {device} with KVM")]
    Register {
        device: String,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot place {device} on the MMIO bus")]
    Bus {
        device: String,
        #[source]
        source: crate::devices::bus::BusError,
    },
    #[error("no interrupt line is left for virtio device {0}")]
    NoSlot(usize),
    #[error(
        "{disks} disk and {taps} tap descriptors were handed over for {configured_disks} \
         disks and {configured_taps} network interfaces"
    )]
    HandedOver {
        disks: usize,
        taps: usize,
        configured_disks: usize,
        configured_taps: usize,
    },
    #[error(
        "disk file {path} holds a saved VM's memory (it has a .waterbear-saved marker); \
         restore or remove that VM first"
    )]
    SavedMemory { path: PathBuf },
    #[error("disks {first} and {second} are the same file; give each disk its own file")]
    SameFile { first: PathBuf, second: PathBuf },
}

/// Descriptors a live update handed over, each in configuration order.
#[derive(Default)]
pub struct HandedOver {
    pub disks: Vec<OwnedFd>,
    pub taps: Vec<OwnedFd>,
}

/// Refuses two disk paths that name one file (a symlink, a hard link) before any is
/// opened, so that the error says so rather than that the second finds the file locked.
fn check_distinct_paths(
    disks: &[crate::devices::virtio::block::BlockConfig],
) -> Result<(), VirtioError> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: Vec<((u64, u64), PathBuf)> = Vec::new();
    for disk in disks {
        let Ok(meta) = std::fs::metadata(&disk.path) else {
            continue; // opening it reports the problem
        };
        let key = (meta.dev(), meta.ino());
        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
            return Err(VirtioError::SameFile {
                first: first.clone(),
                second: disk.path.clone(),
            });
        }
        seen.push((key, disk.path.clone()));
    }
    Ok(())
}

/// A device as placed in the VM.
struct Slot {
    transport: Arc<Mutex<Transport>>,
    /// One ioeventfd per queue, bound to QueueNotify with the queue's index as datamatch.
    queue_evts: Vec<EventFd>,
}

/// The VM's virtio devices and whether they may process their queues.
pub struct VirtioDevices {
    slots: Vec<Slot>,
    /// False while the VM is paused.
    active: Arc<AtomicBool>,
}

/// What a device needs from the VM to be built.
struct Wiring<'a> {
    vm: &'a VmFd,
    mem: &'a Memory,
}

impl VirtioDevices {
    /// Opens every disk and tap of `config` and wires the devices into `vm` and `mmio`,
    /// fresh or from `saved` (one state per device, in configuration order). `handed`,
    /// when not empty, holds the descriptors a live update handed over, used instead of
    /// opening the disks and taps again.
    pub fn create(
        vm: &VmFd,
        mem: &Memory,
        config: &VmConfig,
        saved: Option<&[VirtioDeviceState]>,
        handed: HandedOver,
        mmio: &mut MmioBus,
    ) -> Result<Self, VirtioError> {
        let configured = config.disks.len() + config.nets.len();
        if let Some(saved) = saved {
            if saved.len() != configured {
                return Err(VirtioError::Count {
                    saved: saved.len(),
                    configured,
                });
            }
        }
        let wiring = Wiring { vm, mem };
        let handed_any = !handed.disks.is_empty() || !handed.taps.is_empty();
        if handed_any
            && (handed.disks.len() != config.disks.len()
                || handed.taps.len() != config.nets.len()
                || saved.is_none())
        {
            return Err(VirtioError::HandedOver {
                disks: handed.disks.len(),
                taps: handed.taps.len(),
                configured_disks: config.disks.len(),
                configured_taps: config.nets.len(),
            });
        }
        // Handed-over disks passed this check in the process that opened them.
        if handed.disks.is_empty() {
            check_distinct_paths(&config.disks)?;
        }
        let mut disks = handed.disks.into_iter();
        let mut slots = Vec::with_capacity(configured);
        for (i, disk) in config.disks.iter().enumerate() {
            let state = saved.map(|s| &s[i]);
            let transport = block_transport(&wiring, disk, state, disks.next(), i)?;
            slots.push(place(&wiring, transport, i, mmio)?);
        }
        let mut taps = handed.taps.into_iter();
        for (j, net) in config.nets.iter().enumerate() {
            let i = config.disks.len() + j;
            let state = saved.map(|s| &s[i]);
            let transport = net_transport(&wiring, net, state, taps.next(), i)?;
            slots.push(place(&wiring, transport, i, mmio)?);
        }
        Ok(VirtioDevices {
            slots,
            active: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The disks' and the taps' descriptors, each in configuration order, for a live
    /// update to hand over.
    pub fn handover_fds(&self) -> (Vec<RawFd>, Vec<RawFd>) {
        let (mut disks, mut taps) = (Vec::new(), Vec::new());
        for slot in &self.slots {
            match &*lock(&slot.transport) {
                Transport::Block(t) => disks.push(t.device().file_fd()),
                Transport::Net(t) => taps.push(t.device().as_raw_fd()),
            }
        }
        (disks, taps)
    }

    /// The devices as `GET /vm` shows them: where each sits, whether the guest's driver
    /// runs it, and for a network interface its traffic counters.
    pub fn info(&self) -> Vec<serde_json::Value> {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, slot)| {
                let (base, gsi) = virtio_slot(index).unwrap_or_default();
                let t = lock(&slot.transport);
                let mut v = match &*t {
                    Transport::Block(t) => {
                        let d = t.device();
                        serde_json::json!({
                            "kind": "disk",
                            "id": d.state().id,
                            "path": d.path(),
                            "read_only": d.read_only(),
                            "capacity_sectors": d.capacity_sectors(),
                            "driver": driver_state(t.is_running(), t.needs_reset()),
                        })
                    }
                    Transport::Net(t) => {
                        let d = t.device();
                        serde_json::json!({
                            "kind": "net",
                            "tap": d.config().tap,
                            "mac": d.config().mac.to_string(),
                            "counters": d.counters(),
                            "driver": driver_state(t.is_running(), t.needs_reset()),
                        })
                    }
                };
                v["mmio_base"] = format!("{base:#x}").into();
                v["gsi"] = gsi.into();
                v
            })
            .collect()
    }

    /// Checks that every tap is still there, so that a live update does not hand over a
    /// tap whose interface was deleted (the new process could not use it, and neither
    /// could a fallback: the guest would be lost).
    pub fn check_taps(&self) -> Result<(), VirtioError> {
        for slot in &self.slots {
            if let Transport::Net(t) = &*lock(&slot.transport) {
                t.device().check_attached()?;
            }
        }
        Ok(())
    }

    /// Every device's state, in configuration order. The VM must be paused.
    pub fn state(&self) -> Vec<VirtioDeviceState> {
        self.slots
            .iter()
            .map(|s| lock(&s.transport).state())
            .collect()
    }

    /// Flushes every writable disk to stable storage, so that a snapshot (and a host
    /// reset after it) finds on disk every write the guest has seen completed.
    pub fn sync_disks(&self) -> Result<(), VirtioError> {
        for slot in &self.slots {
            if let Transport::Block(t) = &*lock(&slot.transport) {
                if !t.device().read_only() {
                    t.device().sync()?;
                }
            }
        }
        Ok(())
    }

    /// The disks whose path no longer names the file the VM has open (renamed, deleted or
    /// replaced since): a restore, which opens disks by path, would not find them.
    pub fn disks_moved(&self) -> Vec<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let mut moved = Vec::new();
        for slot in &self.slots {
            let Transport::Block(t) = &*lock(&slot.transport) else {
                continue;
            };
            let disk = t.device();
            // SAFETY: fstat fills a stat buffer for a descriptor the device owns.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            let open = (unsafe { libc::fstat(disk.file_fd(), &mut st) } == 0)
                .then_some((st.st_dev, st.st_ino));
            let named = std::fs::metadata(disk.path())
                .ok()
                .map(|m| (m.dev(), m.ino()));
            if open.is_none() || open != named {
                moved.push(disk.path().to_path_buf());
            }
        }
        moved
    }

    /// Stops queue processing; the vCPUs must be paused first.
    pub fn pause(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    /// Starts queue processing and catches up on what arrived while paused.
    pub fn resume(&self) {
        self.active.store(true, Ordering::SeqCst);
        for slot in &self.slots {
            lock(&slot.transport).process_after_resume();
        }
    }

    /// The event-loop subscriber that processes the queues.
    pub fn subscriber(&self) -> Result<QueueEvents, VirtioError> {
        let mut watched = Vec::new();
        for slot in &self.slots {
            let t = lock(&slot.transport);
            for (queue, evt) in slot.queue_evts.iter().enumerate() {
                let evt = evt.try_clone().map_err(|source| VirtioError::EventFd {
                    device: t.name(),
                    source,
                })?;
                watched.push(Watched {
                    transport: slot.transport.clone(),
                    queue: queue as u32,
                    source: Source::Notify(evt),
                });
            }
            if let Some(fd) = t.backend_fd() {
                watched.push(Watched {
                    transport: slot.transport.clone(),
                    queue: 0,
                    source: Source::Backend(fd),
                });
            }
        }
        Ok(QueueEvents {
            watched,
            active: self.active.clone(),
        })
    }
}

/// Puts device `index` at its slot: the irqfd on its GSI, an ioeventfd per queue on its
/// QueueNotify register, its window on the MMIO bus.
fn place(
    w: &Wiring,
    (transport, irq): (Transport, EventFdInterrupt),
    index: usize,
    mmio: &mut MmioBus,
) -> Result<Slot, VirtioError> {
    let (base, gsi) = virtio_slot(index).ok_or(VirtioError::NoSlot(index))?;
    let device = transport.name();
    let register = |what, source| VirtioError::Register {
        device: device.clone(),
        what,
        source,
    };
    w.vm.register_irqfd(irq.eventfd(), gsi)
        .map_err(|e| register("interrupt", e))?;
    let mut queue_evts = Vec::with_capacity(transport.queue_count());
    for queue in 0..transport.queue_count() as u32 {
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
            VirtioError::EventFd {
                device: device.clone(),
                source,
            }
        })?;
        w.vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY), queue)
            .map_err(|e| register("queue notification", e))?;
        queue_evts.push(evt);
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())
        .map_err(|source| VirtioError::Bus {
            device: device.clone(),
            source,
        })?;
    log::info!("{device}: virtio-mmio at {base:#x}, GSI {gsi}");
    Ok(Slot {
        transport,
        queue_evts,
    })
}
