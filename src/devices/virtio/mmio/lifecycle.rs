//! The transport's side of the device life cycle (virtio 1.x section 3.1): status writes
//! with feature negotiation, starting the device at `DRIVER_OK`, reset, processing a
//! notified queue, and stopping the device when the driver breaks the queue protocol.

use virtio_queue::{QueueState, QueueT};

use super::{MmioTransport, QueueIndexes, QueueRegisters};
use crate::devices::virtio::queue::QueueError;
use crate::devices::virtio::{
    Memory, Queue, VirtioDevice, FEATURE_RING_EVENT_IDX, FEATURE_VERSION_1, INTERRUPT_CONFIG,
    INTERRUPT_VRING, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};

impl<D: VirtioDevice> MmioTransport<D> {
    pub(super) fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set and clear; a driver writing back what it
        // read neither sets nor clears it.
        let kept = self.status & STATUS_DEVICE_NEEDS_RESET;
        let mut new = (value & !STATUS_DEVICE_NEEDS_RESET) | kept;
        if new & self.status != self.status {
            log::debug!(
                "{}: driver tried to clear status bits ({:#x} -> {value:#x}); ignored",
                self.name(),
                self.status
            );
            return;
        }
        let added = new & !self.status;
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable(new) {
            new &= !STATUS_FEATURES_OK;
        }
        if added & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK == 0 {
            log::debug!("{}: DRIVER_OK without FEATURES_OK; ignored", self.name());
            new &= !STATUS_DRIVER_OK;
        }
        let starting = new & !self.status & STATUS_DRIVER_OK != 0;
        self.status = new;
        if starting {
            self.activate();
        }
    }

    /// Whether the driver may set FEATURES_OK: it has gone through ACKNOWLEDGE and DRIVER,
    /// accepted only features the device offers, and accepted VERSION_1 (this transport
    /// has no legacy interface).
    fn features_acceptable(&self, new_status: u32) -> bool {
        let offered = self.device.features();
        let unknown = self.acked_features & !offered;
        let name = self.name();
        if new_status & (STATUS_ACKNOWLEDGE | STATUS_DRIVER) != STATUS_ACKNOWLEDGE | STATUS_DRIVER {
            log::warn!("{name}: FEATURES_OK before ACKNOWLEDGE and DRIVER; refused");
            false
        } else if unknown != 0 {
            log::warn!("{name}: driver accepted features {unknown:#x} never offered; refused");
            false
        } else if self.acked_features & FEATURE_VERSION_1 == 0 {
            log::warn!("{name}: driver did not accept VIRTIO_F_VERSION_1; refused");
            false
        } else {
            true
        }
    }

    /// Builds the ready queues and starts the device; marks it broken when a queue the
    /// driver set up cannot be used.
    fn activate(&mut self) {
        let event_idx = self.acked_features & FEATURE_RING_EVENT_IDX != 0;
        let mut active = Vec::with_capacity(self.queues.len());
        for (index, regs) in self.queues.iter().enumerate() {
            if !regs.ready {
                active.push(None);
                continue;
            }
            match build_queue(regs, QueueIndexes::default(), event_idx, &self.mem) {
                Ok(queue) => active.push(Some(queue)),
                Err(why) => {
                    self.mark_broken(&format!("queue {index} cannot be used: {why}"));
                    return;
                }
            }
        }
        if let Err(e) = self.device.activate(self.acked_features) {
            self.mark_broken(&format!("activation failed: {e}"));
            return;
        }
        self.active = active;
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            *q = QueueRegisters::reset(q.max_size);
        }
        self.active.clear();
    }

    pub(super) fn process_queue(&mut self, index: usize) {
        let Some(Some(queue)) = self.active.get_mut(index) else {
            return;
        };
        let notify = match self.device.process_queue(index, queue, &self.mem) {
            Ok(true) => queue
                .needs_notification(&self.mem)
                .map_err(QueueError::Ring),
            other => other,
        };
        match notify {
            Ok(true) => self.raise(INTERRUPT_VRING),
            Ok(false) => {}
            Err(e) => {
                // Chains completed before the bad one are in the used ring; the one
                // interrupt below makes the driver look at them as well.
                self.interrupt_status |= INTERRUPT_VRING;
                self.mark_broken(&format!("queue {index}: {e}"));
            }
        }
    }

    /// Stops the device after the driver broke the protocol: sets DEVICE_NEEDS_RESET and,
    /// as section 2.1.2 asks, sends a configuration change notification.
    fn mark_broken(&mut self, why: &str) {
        // Logged at the 1st, 2nd, 4th... time: a guest that breaks and resets the device in
        // a loop cannot flood the log.
        self.times_broken += 1;
        if self.times_broken.is_power_of_two() {
            log::error!(
                "{}: {why}; device stopped until the guest driver resets it (broken {} times)",
                self.name(),
                self.times_broken
            );
        }
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 {
            self.raise(INTERRUPT_CONFIG);
        }
    }

    pub(super) fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Err(e) = self.interrupt.trigger(bits) {
            log::warn!("{}: cannot raise the interrupt: {e}", self.name());
        }
    }
}

/// Builds a crate queue from the registers and indexes, checking what the device needs to
/// use it safely: a valid size, aligned rings, and rings inside guest RAM.
pub(super) fn build_queue(
    regs: &QueueRegisters,
    indexes: QueueIndexes,
    event_idx: bool,
    mem: &Memory,
) -> Result<Queue, String> {
    let queue = Queue::try_from(QueueState {
        max_size: regs.max_size,
        next_avail: indexes.next_avail,
        next_used: indexes.next_used,
        event_idx_enabled: event_idx,
        size: regs.size,
        ready: true,
        desc_table: regs.desc_table,
        avail_ring: regs.avail_ring,
        used_ring: regs.used_ring,
    })
    .map_err(|e| e.to_string())?;
    if !queue.is_valid(mem) {
        return Err(format!(
            "its rings (descriptors {:#x}, available {:#x}, used {:#x}, size {}) are not all \
             in guest RAM",
            regs.desc_table, regs.avail_ring, regs.used_ring, regs.size
        ));
    }
    Ok(queue)
}
