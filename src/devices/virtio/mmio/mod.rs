//! The virtio-mmio transport, register layout version 2 (virtio 1.x section 4.2.2).
//!
//! [`MmioTransport`] decodes the driver's accesses to a device's 0x1000-byte register
//! window: feature negotiation, queue set-up, notifications, interrupt acknowledgement and
//! the device status, including reset and the refusal of features the device did not
//! offer. It owns the queues once the driver sets `DRIVER_OK` and hands them to the
//! [`VirtioDevice`] when a queue is notified, then raises the [`Interrupt`].
//!
//! It is independent of KVM: the VMM routes MMIO exits to [`MmioTransport::read`] and
//! [`MmioTransport::write`] and, when it binds an ioeventfd to the QueueNotify register,
//! calls [`MmioTransport::notify_queue`] when that eventfd fires. Saving and restoring the
//! transport lives in [`state`].

mod lifecycle;
pub mod state;

use std::sync::Arc;

use super::{
    Interrupt, Memory, Queue, VirtioDevice, INTERRUPT_CONFIG, STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
};
pub use state::{MmioTransportState, QueueIndexes, QueueRegisters, RestoreError, SavedQueue};

/// Size of a device's register window; the VMM places devices this far apart.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// "virt" in little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Reported in VendorID; drivers do not interpret it.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"WTBR");

/// Register offsets in the window.
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// A virtio device behind its virtio-mmio register window.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: Memory,
    interrupt: Arc<dyn Interrupt>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// What the driver wrote to each queue's registers.
    queues: Vec<QueueRegisters>,
    /// The ready queues once the device is running (`DRIVER_OK`), by queue index; empty
    /// before that and after a reset.
    active: Vec<Option<Queue>>,
    /// How often the driver broke the device, to rate-limit the log.
    times_broken: u64,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport in its reset state for `device`, using `mem` for the queues.
    pub fn new(device: D, mem: Memory, interrupt: Arc<dyn Interrupt>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueRegisters::reset(max))
            .collect();
        Self {
            device,
            mem,
            interrupt,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues,
            active: Vec::new(),
            times_broken: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The device is running: the driver set `DRIVER_OK` and nothing has broken it since.
    pub fn is_running(&self) -> bool {
        self.status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET) == STATUS_DRIVER_OK
    }

    /// The device stopped because the driver broke the queue protocol; only a reset by
    /// the driver brings it back.
    pub fn needs_reset(&self) -> bool {
        self.status & STATUS_DEVICE_NEEDS_RESET != 0
    }

    /// Handles a read of `data.len()` bytes at `offset` in the register window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            let end = offset.saturating_add(data.len() as u64);
            if end > MMIO_WINDOW_SIZE {
                data.fill(0);
                return;
            }
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(out) = <&mut [u8; 4]>::try_from(&mut *data) else {
            log::debug!(
                "{}: {}-byte read of register {offset:#x}",
                self.name(),
                data.len()
            );
            data.fill(0);
            return;
        };
        let value = if offset % 4 == 0 {
            self.read_register(offset)
        } else {
            0
        };
        *out = value.to_le_bytes();
    }

    /// Handles a write of `data` at `offset` in the register window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            let end = offset.saturating_add(data.len() as u64);
            if end <= MMIO_WINDOW_SIZE {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(bytes)),
            _ => log::debug!(
                "{}: ignored {}-byte write to register {offset:#x}",
                self.name(),
                data.len()
            ),
        }
    }

    /// Processes queue `index` as if the driver had written `index` to QueueNotify; the
    /// VMM calls this when the ioeventfd it bound to QueueNotify fires.
    pub fn notify_queue(&mut self, index: u32) {
        if !self.is_running() {
            log::debug!("{}: notify of queue {index} while not running", self.name());
            return;
        }
        match self.active.get(index as usize) {
            Some(Some(_)) => self.process_queue(index as usize),
            _ => log::debug!(
                "{}: notify of queue {index}, which is not ready",
                self.name()
            ),
        }
    }

    /// Tells the driver the device configuration changed: bumps ConfigGeneration and
    /// raises a configuration change interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & STATUS_DRIVER_OK != 0 {
            self.raise(INTERRUPT_CONFIG);
        }
    }

    fn name(&self) -> &str {
        self.device.name()
    }

    fn read_register(&self, offset: u64) -> u32 {
        let features = self.device.features();
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: the specification's "no such region" answer.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => self.write_status(value),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            _ => log::debug!(
                "{}: write to read-only or unknown register {offset:#x}",
                self.name()
            ),
        }
    }

    fn selected_queue(&self) -> Option<&QueueRegisters> {
        self.queues.get(self.queue_select as usize)
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are negotiated after DRIVER and before FEATURES_OK (section 3.1.1).
        if self.status != STATUS_ACKNOWLEDGE | STATUS_DRIVER {
            log::debug!(
                "{}: DriverFeatures write in status {:#x}",
                self.name(),
                self.status
            );
            return;
        }
        let value = u64::from(value);
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | value,
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // Queues are set up after FEATURES_OK and before DRIVER_OK (section 3.1.1).
        let setup = self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED);
        let index = self.queue_select;
        let name = self.device.name();
        if setup != STATUS_FEATURES_OK {
            log::debug!(
                "{name}: queue register {offset:#x} write in status {:#x}",
                self.status
            );
            return;
        }
        let Some(q) = self.queues.get_mut(index as usize) else {
            log::debug!("{name}: queue register {offset:#x} write for absent queue {index}");
            return;
        };
        let value64 = u64::from(value);
        match offset {
            reg::QUEUE_NUM => match u16::try_from(value) {
                Ok(size) if size != 0 && size.is_power_of_two() && size <= q.max_size => {
                    q.size = size
                }
                _ => log::debug!("{name}: queue {index}: ignored invalid size {value}"),
            },
            reg::QUEUE_READY => q.ready = value == 1,
            reg::QUEUE_DESC_LOW => q.desc_table = (q.desc_table & !0xffff_ffff) | value64,
            reg::QUEUE_DESC_HIGH => q.desc_table = (q.desc_table & 0xffff_ffff) | (value64 << 32),
            reg::QUEUE_AVAIL_LOW => q.avail_ring = (q.avail_ring & !0xffff_ffff) | value64,
            reg::QUEUE_AVAIL_HIGH => q.avail_ring = (q.avail_ring & 0xffff_ffff) | (value64 << 32),
            reg::QUEUE_USED_LOW => q.used_ring = (q.used_ring & !0xffff_ffff) | value64,
            reg::QUEUE_USED_HIGH => q.used_ring = (q.used_ring & 0xffff_ffff) | (value64 << 32),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
