//! Saving and restoring a virtio-mmio transport.
//!
//! The saved state is the register file (status, features, selectors, each queue's size,
//! ready flag and ring addresses, interrupt status, config generation) plus, for each ready
//! queue of a running device, the ring positions the device had reached. Guest memory is
//! not part of it: the rings live there and stay in place across a restore.
//!
//! A restore trusts nothing in the state: it is checked against the device it is restored
//! onto and, for a running device, against the rings in guest memory, and refused with a
//! [`RestoreError`] when anything does not fit. A device the guest had broken
//! (`DEVICE_NEEDS_RESET`) comes back broken, without its queues being checked.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

use super::lifecycle::build_queue;
use super::MmioTransport;
use crate::devices::virtio::queue::in_flight;
use crate::devices::virtio::{
    ActivateError, Interrupt, Memory, Queue, VirtioDevice, FEATURE_RING_EVENT_IDX,
    FEATURE_VERSION_1, INTERRUPT_CONFIG, INTERRUPT_VRING, STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
};

const KNOWN_STATUS_BITS: u32 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_FEATURES_OK
    | STATUS_DRIVER_OK
    | STATUS_DEVICE_NEEDS_RESET
    | STATUS_FAILED;

/// One queue's registers as the driver wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegisters {
    /// QueueNumMax: fixed by the device, saved to check the restore target.
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl QueueRegisters {
    /// The registers after a device reset: the largest size, not ready, no rings.
    pub fn reset(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }
}

/// How far the device got in a queue's rings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueIndexes {
    /// The next available ring entry the device will take.
    pub next_avail: u16,
    /// The next used ring entry the device will fill.
    pub next_used: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    pub registers: QueueRegisters,
    /// Present for each ready queue of a device the driver has started (`DRIVER_OK`).
    pub indexes: Option<QueueIndexes>,
}

/// Everything a virtio-mmio transport needs to pick up where it left off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<SavedQueue>,
}

/// Why a saved transport state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("saved state is for virtio device type {saved}, the device is type {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("saved state has {saved} queues, the device has {actual}")]
    QueueCount { saved: usize, actual: usize },
    #[error("saved device status {0:#x} is not a state the transport can be in")]
    Status(u32),
    #[error("saved interrupt status {0:#x} has bits no interrupt sets")]
    InterruptStatus(u32),
    #[error(
        "saved negotiated features {acked:#x} are not a valid choice from the features the \
         device offers ({offered:#x}); was the device configured differently?"
    )]
    Features { acked: u64, offered: u64 },
    #[error("saved queue {index} has maximum size {saved}, the device {actual}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        actual: u16,
    },
    #[error("saved queue {index} has size {size}, not a power of two up to {max}")]
    QueueSize { index: usize, size: u16, max: u16 },
    #[error("saved queue {index} is ready before the features were negotiated")]
    ReadyTooEarly { index: usize },
    #[error("saved queue {index} is in use but its ring positions were not saved")]
    MissingIndexes { index: usize },
    #[error("saved queue {index} cannot be used: {why}")]
    QueueUnusable { index: usize, why: String },
    #[error(
        "saved queue {index} has used {saved} entries but the used ring in guest memory says \
         {in_memory}; the memory is not the memory this state was saved with"
    )]
    UsedIndex {
        index: usize,
        saved: u16,
        in_memory: u16,
    },
    #[error(
        "saved queue {index}: the available ring index {avail_idx} is more than the queue \
         size {size} ahead of the next entry {next_avail}"
    )]
    AvailIndex {
        index: usize,
        avail_idx: u16,
        next_avail: u16,
        size: u16,
    },
    #[error(
        "saved queue {index}: next available entry {next_avail} is more than the queue size \
         {size} ahead of next used entry {next_used}"
    )]
    InFlight {
        index: usize,
        next_avail: u16,
        next_used: u16,
        size: u16,
    },
    #[error("the restored device refused to start")]
    Activate(#[source] ActivateError),
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport's state, for a snapshot. Call it with the VM paused: a notification
    /// processed after this call is not in the state.
    pub fn save(&self) -> MmioTransportState {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, registers)| SavedQueue {
                registers: *registers,
                indexes: self
                    .active
                    .get(index)
                    .and_then(Option::as_ref)
                    .filter(|_| registers.ready)
                    .map(|q| QueueIndexes {
                        next_avail: q.next_avail(),
                        next_used: q.next_used(),
                    }),
            })
            .collect();
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues,
        }
    }

    /// Rebuilds a transport for `device` from `state`, checking the state against the
    /// device and against the rings in `mem`, and restarts the device if it was running.
    /// Call [`MmioTransport::process_after_resume`] when the VM resumes.
    pub fn restore(
        device: D,
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        state: &MmioTransportState,
    ) -> Result<Self, RestoreError> {
        let mut t = Self::new(device, mem, interrupt);
        t.check_registers(state)?;

        t.status = state.status;
        t.device_features_select = state.device_features_select;
        t.driver_features_select = state.driver_features_select;
        t.acked_features = state.acked_features;
        t.queue_select = state.queue_select;
        t.interrupt_status = state.interrupt_status;
        t.config_generation = state.config_generation;
        t.queues = state.queues.iter().map(|q| q.registers).collect();

        if t.is_running() {
            t.active = t.restore_queues(state)?;
            t.device
                .activate(t.acked_features)
                .map_err(RestoreError::Activate)?;
        }
        Ok(t)
    }

    /// Catches up after a pause, a restore or a live update: processes every ready queue
    /// once, since a notification the driver sent while the VMM was not listening is lost,
    /// then raises the interrupt so the driver looks at its used rings and, for a device it
    /// broke, at the device status.
    pub fn process_after_resume(&mut self) {
        for index in 0..self.active.len() {
            if self.is_running() {
                self.process_queue(index);
            }
        }
        let mut bits = self.interrupt_status;
        if self.is_running() {
            bits |= INTERRUPT_VRING;
        }
        if bits != 0 {
            self.raise(bits);
        }
    }

    fn check_registers(&self, state: &MmioTransportState) -> Result<(), RestoreError> {
        let actual = self.device.device_type();
        if state.device_type != actual {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                actual,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                actual: self.queues.len(),
            });
        }
        let status = state.status;
        let has = |bits: u32| status & bits == bits;
        if status & !KNOWN_STATUS_BITS != 0
            || (has(STATUS_FEATURES_OK) && !has(STATUS_ACKNOWLEDGE | STATUS_DRIVER))
            || (has(STATUS_DRIVER_OK) && !has(STATUS_FEATURES_OK))
            || (has(STATUS_DEVICE_NEEDS_RESET) && !has(STATUS_DRIVER_OK))
        {
            return Err(RestoreError::Status(status));
        }
        if state.interrupt_status & !(INTERRUPT_VRING | INTERRUPT_CONFIG) != 0 {
            return Err(RestoreError::InterruptStatus(state.interrupt_status));
        }
        let offered = self.device.features();
        let acked = state.acked_features;
        if has(STATUS_FEATURES_OK) && (acked & !offered != 0 || acked & FEATURE_VERSION_1 == 0) {
            return Err(RestoreError::Features { acked, offered });
        }
        for (index, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            let regs = &saved.registers;
            if regs.max_size != current.max_size {
                return Err(RestoreError::QueueMaxSize {
                    index,
                    saved: regs.max_size,
                    actual: current.max_size,
                });
            }
            if regs.size == 0 || !regs.size.is_power_of_two() || regs.size > regs.max_size {
                return Err(RestoreError::QueueSize {
                    index,
                    size: regs.size,
                    max: regs.max_size,
                });
            }
            if regs.ready && !has(STATUS_FEATURES_OK) {
                return Err(RestoreError::ReadyTooEarly { index });
            }
        }
        Ok(())
    }

    /// The queues of a running device, rebuilt and checked against guest memory.
    fn restore_queues(
        &self,
        state: &MmioTransportState,
    ) -> Result<Vec<Option<Queue>>, RestoreError> {
        let event_idx = state.acked_features & FEATURE_RING_EVENT_IDX != 0;
        let mut active = Vec::with_capacity(state.queues.len());
        for (index, saved) in state.queues.iter().enumerate() {
            if !saved.registers.ready {
                active.push(None);
                continue;
            }
            let indexes = saved
                .indexes
                .ok_or(RestoreError::MissingIndexes { index })?;
            let queue = build_queue(&saved.registers, indexes, event_idx, &self.mem)
                .map_err(|why| RestoreError::QueueUnusable { index, why })?;
            check_indexes(index, &queue, &self.mem)?;
            active.push(Some(queue));
        }
        Ok(active)
    }
}

/// Checks the saved ring positions against the rings in guest memory: the used index the
/// device last published must be there, and neither the driver nor the device can be more
/// than a ring's worth ahead of the other.
fn check_indexes(index: usize, queue: &Queue, mem: &Memory) -> Result<(), RestoreError> {
    let unusable = |e: virtio_queue::Error| RestoreError::QueueUnusable {
        index,
        why: e.to_string(),
    };
    let size = queue.size();
    let in_memory = queue.used_idx(mem, Ordering::Acquire).map_err(unusable)?.0;
    if in_memory != queue.next_used() {
        return Err(RestoreError::UsedIndex {
            index,
            saved: queue.next_used(),
            in_memory,
        });
    }
    let avail_idx = queue.avail_idx(mem, Ordering::Acquire).map_err(unusable)?;
    if (avail_idx - Wrapping(queue.next_avail())).0 > size {
        return Err(RestoreError::AvailIndex {
            index,
            avail_idx: avail_idx.0,
            next_avail: queue.next_avail(),
            size,
        });
    }
    if in_flight(queue) > size {
        return Err(RestoreError::InFlight {
            index,
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
            size,
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
