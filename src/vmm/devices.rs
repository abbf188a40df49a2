//! The VM's emulated devices as one set: creating them fresh or from saved state,
//! wiring their interrupts, and reading their state back.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::config::VmConfig;
use super::saved::DevicesState;
use super::virtio::{HandedOver, VirtioDevices};
use super::VmmError;
use crate::devices::bus::{lock, MmioBus, PioBus};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{output_for, OutputPump, SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::virtio::Memory;

/// The devices of one VM and the events they signal the event loop with.
pub struct Devices {
    pub pio: Arc<PioBus>,
    pub mmio: Arc<MmioBus>,
    pub virtio: VirtioDevices,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub serial_input_ready: EventFd,
    pub serial_pump: OutputPump,
    pub reset_evt: EventFd,
}

fn new_eventfd(what: &'static str) -> Result<EventFd, VmmError> {
    // Close-on-exec: a live update's new process makes its own.
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|source| VmmError::Setup { what, source })
}

fn dup(e: &EventFd, what: &'static str) -> Result<EventFd, VmmError> {
    e.try_clone()
        .map_err(|source| VmmError::Setup { what, source })
}

impl Devices {
    /// Creates the serial port, the i8042 and the virtio devices of `config`, fresh or
    /// from `saved`; `handed` holds descriptors a live update handed over (or none).
    pub fn create(
        vm: &VmFd,
        mem: &Memory,
        config: &VmConfig,
        saved: Option<&DevicesState>,
        handed: HandedOver,
    ) -> Result<Self, VmmError> {
        let serial_mode = &config.serial;
        let serial_irq = new_eventfd("the serial interrupt")?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|source| VmmError::Irq {
                what: "the serial port",
                source,
            })?;
        let input_ready = new_eventfd("the serial input event")?;
        let (out, serial_pump) = output_for(serial_mode)?;
        let ready = dup(&input_ready, "the serial input event")?;
        let serial = match saved {
            Some(s) => SerialDevice::from_state(serial_irq, ready, out, &s.serial)
                .map_err(VmmError::SerialState)?,
            None => SerialDevice::new(serial_irq, ready, out),
        };
        let serial = Arc::new(Mutex::new(serial));

        let reset_evt = new_eventfd("the reset event")?;
        let reset = dup(&reset_evt, "the reset event")?;
        let i8042 = Arc::new(Mutex::new(match saved {
            Some(s) => I8042::from_state(reset, &s.i8042),
            None => I8042::new(reset),
        }));

        let mut pio = PioBus::new();
        let bus_err = |e| VmmError::Setup {
            what: "the port I/O bus",
            source: std::io::Error::other(e),
        };
        pio.insert(COM1_BASE, COM1_LEN, serial.clone())
            .map_err(bus_err)?;
        pio.insert(I8042_BASE, I8042_LEN, i8042.clone())
            .map_err(bus_err)?;

        let mut mmio = MmioBus::new();
        let virtio = VirtioDevices::create(
            vm,
            mem,
            config,
            saved.map(|s| s.virtio.as_slice()),
            handed,
            &mut mmio,
        )?;
        Ok(Devices {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            virtio,
            serial,
            i8042,
            serial_input_ready: input_ready,
            serial_pump,
            reset_evt,
        })
    }

    /// The devices' state; the vCPUs must be paused so no register changes meanwhile.
    pub fn state(&self) -> DevicesState {
        DevicesState {
            serial: lock(&self.serial).state(),
            i8042: lock(&self.i8042).state(),
            virtio: self.virtio.state(),
        }
    }
}
