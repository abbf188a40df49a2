//! Test helpers: guest memory, the driver's side of a split virtqueue, an interrupt that
//! records what it raised, a minimal device, and the driver's start-up sequence through the
//! transport's registers.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::mmio::{reg, MmioTransport};
use super::queue::{drain, QueueError};
use super::{
    ActivateError, Interrupt, Memory, Queue, VirtioDevice, FEATURE_RING_EVENT_IDX,
    FEATURE_VERSION_1, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};

pub const MEM_SIZE: usize = 0x10_0000;
/// Where test data buffers go; queues sit below.
pub const DATA: u64 = 0x8_0000;

pub fn memory() -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Records every `trigger` call.
#[derive(Default)]
pub struct RecordingInterrupt {
    raised: Mutex<Vec<u32>>,
}

impl RecordingInterrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The bits of each trigger since the last call.
    pub fn take(&self) -> Vec<u32> {
        std::mem::take(&mut *self.raised.lock().unwrap())
    }
}

impl Interrupt for RecordingInterrupt {
    fn trigger(&self, status_bits: u32) -> std::io::Result<()> {
        self.raised.lock().unwrap().push(status_bits);
        Ok(())
    }
}

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// The driver's side of a split queue: descriptor table at `base`, available ring at
/// `base + 0x1000`, used ring at `base + 0x2000` (room for up to 256 entries).
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_free: u16,
    avail_idx: u16,
}

impl DriverQueue {
    pub fn new(size: u16, base: u64) -> Self {
        Self {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_free: 0,
            avail_idx: 0,
        }
    }

    /// Writes descriptor `index` of the table at `table`.
    pub fn write_desc(mem: &Memory, table: u64, index: u16, desc: (u64, u32, u16, u16)) {
        let at = GuestAddress(table + 16 * u64::from(index));
        let (addr, len, flags, next) = desc;
        mem.write_obj(addr.to_le(), at).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
            .unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))
            .unwrap();
    }

    /// Puts `bufs` (address, length, device-writable) in consecutive descriptors, linked
    /// in order, and makes the chain available. Returns its head.
    pub fn add_chain(&mut self, mem: &Memory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_free;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            let next = (index + 1) % self.size;
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            Self::write_desc(mem, self.desc, index, (addr, len, flags, next));
        }
        self.next_free = (head + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// Appends `head` to the available ring and bumps its index.
    pub fn publish(&mut self, mem: &Memory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    pub fn set_avail_idx(&self, mem: &Memory, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// With EVENT_IDX: asks for an interrupt once the used index passes `idx`, as a driver
    /// does when it has seen every used entry up to `idx`.
    pub fn set_used_event(&self, mem: &Memory, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(idx.to_le(), GuestAddress(at)).unwrap();
    }

    pub fn used_idx(&self, mem: &Memory) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// Used ring entry `i`: (descriptor head, bytes written).
    pub fn used_elem(&self, mem: &Memory, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }
}

pub fn read_reg<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

pub fn write_reg<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Negotiates `features` the way Linux's virtio_mmio driver does; returns the status read
/// back after setting FEATURES_OK.
pub fn negotiate<D: VirtioDevice>(t: &mut MmioTransport<D>, features: u64) -> u32 {
    write_reg(t, reg::STATUS, 0);
    write_reg(t, reg::STATUS, STATUS_ACKNOWLEDGE);
    write_reg(t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_reg(t, reg::DRIVER_FEATURES_SEL, 1);
    write_reg(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    write_reg(t, reg::DRIVER_FEATURES_SEL, 0);
    write_reg(t, reg::DRIVER_FEATURES, features as u32);
    write_reg(
        t,
        reg::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    read_reg(t, reg::STATUS)
}

/// Sets up queue `index` from `q` and marks it ready.
pub fn setup_queue<D: VirtioDevice>(t: &mut MmioTransport<D>, index: u32, q: &DriverQueue) {
    write_reg(t, reg::QUEUE_SEL, index);
    write_reg(t, reg::QUEUE_NUM, u32::from(q.size));
    for (low, addr) in [
        (reg::QUEUE_DESC_LOW, q.desc),
        (reg::QUEUE_AVAIL_LOW, q.avail),
        (reg::QUEUE_USED_LOW, q.used),
    ] {
        write_reg(t, low, addr as u32);
        write_reg(t, low + 4, (addr >> 32) as u32);
    }
    write_reg(t, reg::QUEUE_READY, 1);
}

/// The whole start-up: negotiate `features`, set up `queues` (queue i from queues[i]),
/// DRIVER_OK.
pub fn start<D: VirtioDevice>(t: &mut MmioTransport<D>, queues: &[DriverQueue], features: u64) {
    let status = negotiate(t, features);
    assert_ne!(status & STATUS_FEATURES_OK, 0, "features refused");
    for (i, q) in queues.iter().enumerate() {
        setup_queue(t, i as u32, q);
    }
    write_reg(t, reg::STATUS, status | STATUS_DRIVER_OK);
}

/// A device with two queues that returns every chain with a used length of 0, and
/// records what the transport asked of it.
pub struct TestDevice {
    pub max_sizes: Vec<u16>,
    pub features: u64,
    pub config: [u8; 8],
    pub acked: Option<u64>,
    pub processed: Vec<usize>,
    pub resets: usize,
    pub fail_activate: bool,
}

impl TestDevice {
    pub const FEATURES: u64 = FEATURE_VERSION_1 | FEATURE_RING_EVENT_IDX | 1;

    pub fn new() -> Self {
        Self {
            max_sizes: vec![16, 16],
            features: Self::FEATURES,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            acked: None,
            processed: Vec::new(),
            resets: 0,
            fail_activate: false,
        }
    }
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        42
    }

    fn name(&self) -> &str {
        "test device"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(v) = self.config.get(offset as usize + i) {
                *b = *v;
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(v) = self.config.get_mut(offset as usize + i) {
                *v = *b;
            }
        }
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::Backend(std::io::Error::other("test")));
        }
        self.acked = Some(acked_features);
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError> {
        self.processed.push(index);
        drain(queue, mem, |_| 0)
    }

    fn reset(&mut self) {
        self.resets += 1;
        self.acked = None;
    }
}
