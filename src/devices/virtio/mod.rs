//! Virtio devices on the virtio-mmio transport (virtio 1.x, MMIO register layout version 2).
//!
//! This module owns the transport ([`mmio::MmioTransport`]), the checks every device applies
//! to the descriptor chains a driver hands it ([`queue`]), the devices ([`block`], [`net`]) and their
//! saved state. The split rings themselves come from the rust-vmm `virtio-queue` crate.
//!
//! It does not own where a device sits in the guest's address space or which interrupt line
//! it uses, the MMIO bus that routes vCPU exits to it, the irqfd and ioeventfd registrations
//! with KVM, or the ACPI and command-line entries through which a guest finds the devices:
//! the VMM does all of that and hands each transport an [`Interrupt`] to signal through.
//!
//! A device never trusts the guest: a queue index out of range, a descriptor chain that
//! does not end, or a buffer outside guest RAM marks the device broken
//! (`DEVICE_NEEDS_RESET`) instead of panicking or stalling the VMM.

pub mod block;
pub mod mmio;
pub mod net;
pub mod queue;
#[cfg(test)]
mod testutil;

use std::io;

use virtio_bindings::virtio_config;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_queue::Queue;

/// Guest memory as the virtio devices access it.
pub type Memory = vm_memory::GuestMemoryMmap;

/// Device status bits (virtio 1.x section 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub const STATUS_DRIVER: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER;
pub const STATUS_DRIVER_OK: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
pub const STATUS_FEATURES_OK: u32 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
pub const STATUS_FAILED: u32 = virtio_config::VIRTIO_CONFIG_S_FAILED;

/// Feature bits every device here shares, as masks on the 64-bit feature word.
pub const FEATURE_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
pub const FEATURE_RING_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const FEATURE_RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// InterruptStatus bits: a queue has new used buffers; the configuration (or the device
/// status, for `DEVICE_NEEDS_RESET`) changed.
pub const INTERRUPT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INTERRUPT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The line a transport raises towards the guest.
///
/// The transport keeps the InterruptStatus register itself and calls `trigger` each time it
/// sets bits in it; `status_bits` are the bits just set. An implementation backed by an
/// irqfd only has to signal its eventfd ([`EventFdInterrupt`]).
pub trait Interrupt: Send + Sync {
    fn trigger(&self, status_bits: u32) -> io::Result<()>;
}

/// Raises the interrupt by writing to an eventfd the VMM has bound to the device's GSI with
/// `KVM_IRQFD` (edge-triggered: one injection per write).
pub struct EventFdInterrupt {
    fd: EventFd,
}

impl EventFdInterrupt {
    pub fn new(fd: EventFd) -> Self {
        Self { fd }
    }

    /// The eventfd to register with `KVM_IRQFD`.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }
}

impl Interrupt for EventFdInterrupt {
    fn trigger(&self, _status_bits: u32) -> io::Result<()> {
        self.fd.write(1)
    }
}

/// Copies a device's configuration space from `offset` into `data`; bytes past its end
/// read as zero, as [`VirtioDevice::read_config`] promises.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < space.len() {
        let n = data.len().min(space.len() - start);
        data[..n].copy_from_slice(&space[start..start + n]);
    }
}

/// A failure to start a device once the driver has set `DRIVER_OK`.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device backend refused to start")]
    Backend(#[source] io::Error),
}

/// A virtio device as the transport drives it.
///
/// The transport owns the queues and guest memory and hands them to the device per call,
/// so a device keeps only its own backend state; that keeps save and restore of the queue
/// state in one place (the transport) for every device type.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 for block, 1 for network).
    fn device_type(&self) -> u32;

    /// Names the device in log messages, e.g. `virtio-blk rootfs`.
    fn name(&self) -> &str;

    /// One entry per queue: the largest size the driver may configure (a power of two).
    fn queue_max_sizes(&self) -> &[u16];

    /// The features the device offers. Must include [`FEATURE_VERSION_1`].
    fn features(&self) -> u64;

    /// Reads device configuration space at `offset` (relative to its start). Bytes past
    /// the end of the configuration read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space. Devices without writable fields (the default)
    /// ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "{}: ignored {}-byte config write at {offset:#x}",
            self.name(),
            data.len()
        );
    }

    /// Starts the device with the features the driver accepted; the transport has checked
    /// them against [`VirtioDevice::features`] and checked every ready queue.
    fn activate(&mut self, acked_features: u64) -> Result<(), ActivateError>;

    /// Consumes the buffers the driver has made available on queue `index`. Returns whether
    /// any buffer went to the used ring, so the transport knows whether to interrupt.
    ///
    /// An error means the driver broke the queue protocol; the transport then marks the
    /// device as needing a reset and never calls this again until the driver resets it.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, queue::QueueError>;

    /// Returns the device to its state before activation (the driver wrote 0 to Status).
    fn reset(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_interrupt_signals_its_eventfd_once_per_trigger() {
        let irq = EventFdInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        irq.trigger(INTERRUPT_VRING).unwrap();
        irq.trigger(INTERRUPT_CONFIG).unwrap();
        assert_eq!(irq.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn transport_with_a_block_or_net_device_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<mmio::MmioTransport<block::Block>>();
        assert_send::<mmio::MmioTransport<net::Net>>();
    }
}
