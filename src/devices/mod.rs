//! Emulated devices and the port I/O bus that routes vCPU exits to them.
//!
//! Each device owns its registers; the bus only maps port ranges to devices.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
