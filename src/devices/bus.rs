//! The port I/O and MMIO buses: map address ranges to devices for the vCPU exit handlers.

use std::sync::{Arc, Mutex};

/// A device reached through port I/O. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A device reached through memory-mapped I/O. `offset` is relative to its window's base.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("address range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("address range {base:#x}+{len:#x} is empty or wraps past the end of the bus")]
    BadRange { base: u64, len: u64 },
}

struct Entry<D: ?Sized> {
    base: u64,
    len: u64,
    device: Arc<Mutex<D>>,
}

/// Non-overlapping address ranges and their devices, on a bus whose last address is `top`.
struct Ranges<D: ?Sized> {
    top: u64,
    entries: Vec<Entry<D>>,
}

impl<D: ?Sized> Ranges<D> {
    fn new(top: u64) -> Self {
        Self {
            top,
            entries: Vec::new(),
        }
    }

    fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<D>>) -> Result<(), BusError> {
        let end = base
            .checked_add(len.wrapping_sub(1))
            .filter(|end| len > 0 && *end <= self.top);
        let Some(end) = end else {
            return Err(BusError::BadRange { base, len });
        };
        if self
            .entries
            .iter()
            .any(|e| base <= e.base + (e.len - 1) && e.base <= end)
        {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    /// The device claiming `addr` and the offset of `addr` in its range.
    fn find(&self, addr: u64) -> Option<(&Arc<Mutex<D>>, u64)> {
        self.entries
            .iter()
            .find(|e| addr >= e.base && addr - e.base < e.len)
            .map(|e| (&e.device, addr - e.base))
    }
}

/// Port ranges and their devices; unclaimed ports read as all ones and ignore writes,
/// as on real hardware with nothing decoding the address.
pub struct PioBus {
    ranges: Ranges<dyn PioDevice>,
}

impl Default for PioBus {
    fn default() -> Self {
        Self {
            ranges: Ranges::new(u64::from(u16::MAX)),
        }
    }
}

impl PioBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        self.ranges.insert(base.into(), len.into(), device)
    }

    /// Handles an `in`; returns false when no device claims the port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.ranges.find(port.into()) {
            Some((device, offset)) => {
                lock(device).read(offset as u16, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Handles an `out`; returns false when no device claims the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.ranges.find(port.into()) {
            Some((device, offset)) => {
                lock(device).write(offset as u16, data);
                true
            }
            None => false,
        }
    }
}

/// MMIO windows and their devices; unclaimed addresses read as all ones and ignore writes.
pub struct MmioBus {
    ranges: Ranges<dyn MmioDevice>,
}

impl Default for MmioBus {
    fn default() -> Self {
        Self {
            ranges: Ranges::new(u64::MAX),
        }
    }
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), BusError> {
        self.ranges.insert(base, len, device)
    }

    /// Handles a load; returns false when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.ranges.find(addr) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Handles a store; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.ranges.find(addr) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a previous holder panicked: device state is plain
/// registers, so the guest is better served by a device that keeps working.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn reads_and_writes_reach_the_device_at_its_offset() {
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(0x10))))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 0x12);
        assert!(bus.write(0x3f8, &[0x20]));
        bus.read(0x3f8, &mut b);
        assert_eq!(b[0], 0x20);
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let bus = PioBus::new();
        let mut b = [0u8; 2];
        assert!(!bus.read(0x80, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.write(0x80, &[1]));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = PioBus::new();
        bus.insert(0x60, 1, Arc::new(Mutex::new(Echo(0)))).unwrap();
        bus.insert(0x64, 1, Arc::new(Mutex::new(Echo(0)))).unwrap();
        assert_eq!(
            bus.insert(0x5f, 2, Arc::new(Mutex::new(Echo(0)))).err(),
            Some(BusError::Overlap { base: 0x5f, len: 2 })
        );
        assert!(bus
            .insert(0xffff, 2, Arc::new(Mutex::new(Echo(0))))
            .is_err());
        assert!(bus.insert(0x70, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
    }

    struct Window(Vec<u8>);
    impl MmioDevice for Window {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn mmio_accesses_reach_the_window_at_their_offset() {
        let mut bus = MmioBus::new();
        let dev = Arc::new(Mutex::new(Window(vec![0; 0x1000])));
        bus.insert(0xd000_0000, 0x1000, dev.clone()).unwrap();
        assert!(bus.write(0xd000_0ffc, &[1, 2, 3, 4]));
        assert_eq!(&lock(&dev).0[0xffc..], &[1, 2, 3, 4]);
        let mut b = [0u8; 4];
        assert!(bus.read(0xd000_0ffc, &mut b));
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(!bus.read(0xd000_1000, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0xcfff_ffff, &[0]));
        assert_eq!(
            bus.insert(0xd000_0800, 0x1000, dev.clone()).err(),
            Some(BusError::Overlap {
                base: 0xd000_0800,
                len: 0x1000
            })
        );
        assert!(bus.insert(u64::MAX, 2, dev).is_err());
    }
}
