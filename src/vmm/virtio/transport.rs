//! One device behind its virtio-mmio transport, as the VMM handles it whatever its
//! kind: building it fresh or from its saved state with its interrupt eventfd, routing
//! register accesses, saving it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioError, Wiring};
use crate::devices::bus::MmioDevice;
use crate::devices::virtio::block::{Block, BlockConfig, BlockState};
use crate::devices::virtio::mmio::{MmioTransport, MmioTransportState};
use crate::devices::virtio::net::{Net, NetConfig, NetState};
use crate::devices::virtio::{EventFdInterrupt, Interrupt, VirtioDevice};
use crate::vmm::memory::saved_marker;

/// A device's state in a snapshot: its backend and its transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtioDeviceState {
    Block {
        disk: BlockState,
        transport: MmioTransportState,
    },
    Net {
        net: NetState,
        transport: MmioTransportState,
    },
}

impl VirtioDeviceState {
    fn kind(&self) -> &'static str {
        match self {
            VirtioDeviceState::Block { .. } => "disk",
            VirtioDeviceState::Net { .. } => "network interface",
        }
    }

    /// The error for this state found where the configuration has a `configured`.
    fn not_a(&self, index: usize, configured: &'static str) -> VirtioError {
        VirtioError::Kind {
            index,
            saved: self.kind(),
            configured,
        }
    }
}

/// One device behind its transport.
pub enum Transport {
    Block(MmioTransport<Block>),
    Net(MmioTransport<Net>),
}

impl Transport {
    pub(super) fn notify_queue(&mut self, index: u32) {
        match self {
            Transport::Block(t) => t.notify_queue(index),
            Transport::Net(t) => t.notify_queue(index),
        }
    }

    pub(super) fn process_after_resume(&mut self) {
        match self {
            Transport::Block(t) => t.process_after_resume(),
            Transport::Net(t) => t.process_after_resume(),
        }
    }

    pub(super) fn state(&self) -> VirtioDeviceState {
        match self {
            Transport::Block(t) => VirtioDeviceState::Block {
                disk: t.device().state(),
                transport: t.save(),
            },
            Transport::Net(t) => VirtioDeviceState::Net {
                net: t.device().state(),
                transport: t.save(),
            },
        }
    }

    pub(super) fn name(&self) -> String {
        match self {
            Transport::Block(t) => t.device().name().to_string(),
            Transport::Net(t) => t.device().name().to_string(),
        }
    }

    pub(super) fn queue_count(&self) -> usize {
        match self {
            Transport::Block(t) => t.device().queue_max_sizes().len(),
            Transport::Net(t) => t.device().queue_max_sizes().len(),
        }
    }

    /// The file descriptor whose readiness means work for queue 0 (a tap's received
    /// frames), if any.
    pub(super) fn backend_fd(&self) -> Option<RawFd> {
        match self {
            Transport::Block(_) => None,
            Transport::Net(t) => Some(t.device().as_raw_fd()),
        }
    }
}

impl MmioDevice for Transport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self {
            Transport::Block(t) => t.read(offset, data),
            Transport::Net(t) => t.read(offset, data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match self {
            Transport::Block(t) => t.write(offset, data),
            Transport::Net(t) => t.write(offset, data),
        }
    }
}

/// "running" once the guest's driver started the device, "needs_reset" after the driver
/// broke it, "not_started" before.
pub(super) fn driver_state(running: bool, needs_reset: bool) -> &'static str {
    if needs_reset {
        "needs_reset"
    } else if running {
        "running"
    } else {
        "not_started"
    }
}

pub(super) fn block_transport(
    w: &Wiring,
    config: &BlockConfig,
    saved: Option<&VirtioDeviceState>,
    handed: Option<OwnedFd>,
    index: usize,
) -> Result<(Transport, EventFdInterrupt), VirtioError> {
    // A saved VM's memory file (its marker says so) is no disk: writing it would destroy
    // that VM. A running VM's memory file is refused by its lock.
    if !config.read_only && saved_marker(&config.path).exists() {
        return Err(VirtioError::SavedMemory {
            path: config.path.clone(),
        });
    }
    let transport = match saved {
        None => with_interrupt(w, &config.id, None, Block::open(config)?)?,
        Some(VirtioDeviceState::Block { disk, transport }) => {
            let device = match handed {
                Some(fd) => Block::restore_handed_over(config, disk, fd)?,
                None => Block::restore(config, disk)?,
            };
            with_interrupt(w, &config.id, Some(transport), device)?
        }
        Some(other) => return Err(other.not_a(index, "disk")),
    };
    Ok((Transport::Block(transport.0), transport.1))
}

pub(super) fn net_transport(
    w: &Wiring,
    config: &NetConfig,
    saved: Option<&VirtioDeviceState>,
    handed_tap: Option<OwnedFd>,
    index: usize,
) -> Result<(Transport, EventFdInterrupt), VirtioError> {
    let transport = match saved {
        None => with_interrupt(w, &config.tap, None, Net::open(config)?)?,
        Some(VirtioDeviceState::Net { net, transport }) => {
            let device = match handed_tap {
                Some(fd) => Net::restore_attached(config, net, fd)?,
                None => Net::restore(config, net)?,
            };
            with_interrupt(w, &config.tap, Some(transport), device)?
        }
        Some(other) => return Err(other.not_a(index, "network interface")),
    };
    Ok((Transport::Net(transport.0), transport.1))
}

/// Puts `device` behind a transport, fresh or restored from `saved`, with a new
/// interrupt eventfd; returns the transport and the interrupt for `place` to bind.
fn with_interrupt<D: VirtioDevice>(
    w: &Wiring,
    label: &str,
    saved: Option<&MmioTransportState>,
    device: D,
) -> Result<(MmioTransport<D>, EventFdInterrupt), VirtioError> {
    let irq = interrupt(label)?;
    let shared: Arc<dyn Interrupt> = Arc::new(irq_clone(&irq, label)?);
    let transport = match saved {
        None => MmioTransport::new(device, w.mem.clone(), shared),
        Some(state) => {
            let name = device.name().to_string();
            MmioTransport::restore(device, w.mem.clone(), shared, state).map_err(|source| {
                VirtioError::Restore {
                    device: name,
                    source,
                }
            })?
        }
    };
    Ok((transport, irq))
}

fn interrupt(device: &str) -> Result<EventFdInterrupt, VirtioError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map(EventFdInterrupt::new)
        .map_err(|source| VirtioError::EventFd {
            device: device.to_string(),
            source,
        })
}

fn irq_clone(irq: &EventFdInterrupt, device: &str) -> Result<EventFdInterrupt, VirtioError> {
    irq.eventfd()
        .try_clone()
        .map(EventFdInterrupt::new)
        .map_err(|source| VirtioError::EventFd {
            device: device.to_string(),
            source,
        })
}
