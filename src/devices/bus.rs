//! The port I/O bus: maps port ranges to devices for the vCPU exit handlers.

use std::sync::{Arc, Mutex};

/// A device reached through port I/O. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("port range {base:#x}+{len} overlaps a device already on the bus")]
    Overlap { base: u16, len: u16 },
    #[error("port range {base:#x}+{len} is empty or wraps past 0xffff")]
    BadRange { base: u16, len: u16 },
}

struct Entry {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Port ranges and their devices; unclaimed ports read as all ones and ignore writes,
/// as on real hardware with nothing decoding the address.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<Entry>,
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
        let end = base.checked_add(len - 1).filter(|_| len > 0);
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

    fn find(&self, port: u16) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| port >= e.base && port - e.base < e.len)
    }

    /// Handles an `in`; returns false when no device claims the port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some(e) => {
                lock(&e.device).read(port - e.base, data);
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
        match self.find(port) {
            Some(e) => {
                lock(&e.device).write(port - e.base, data);
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
    }
}
