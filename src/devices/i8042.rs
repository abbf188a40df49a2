//! A minimal i8042 keyboard controller: enough for Linux to probe it and for the guest
//! to reset the machine with command 0xFE (pulse the reset line), which is how
//! `reboot` ends a guest without ACPI.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::bus::PioDevice;

/// Data port (0x60) and command/status port (0x64) as offsets from 0x60.
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;
const DATA_OFFSET: u16 = 0;
const COMMAND_OFFSET: u16 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_RESET_CPU: u8 = 0xfe;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;

/// Controller state: the status and configuration bytes and one pending output byte.
pub struct I8042 {
    reset_evt: EventFd,
    status: u8,
    control: u8,
    output: Option<u8>,
    pending_command: Option<u8>,
}

/// The controller's registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub control: u8,
    pub output: Option<u8>,
    pub pending_command: Option<u8>,
}

impl I8042 {
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            output: self.output,
            pending_command: self.pending_command,
        }
    }

    pub fn from_state(reset_evt: EventFd, state: &I8042State) -> Self {
        I8042 {
            reset_evt,
            status: state.status,
            control: state.control,
            output: state.output,
            pending_command: state.pending_command,
        }
    }

    /// `reset_evt` is written when the guest asks for a CPU reset.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 {
            reset_evt,
            status: STATUS_SYSTEM_FLAG,
            control: 0,
            output: None,
            pending_command: None,
        }
    }

    fn push_output(&mut self, byte: u8) {
        self.output = Some(byte);
        self.status |= STATUS_OUTPUT_FULL;
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_COMMAND;
        match cmd {
            CMD_RESET_CPU => {
                log::info!("guest requested a reset through the i8042 controller");
                if let Err(e) = self.reset_evt.write(1) {
                    log::error!("cannot signal the guest reset: {e}");
                }
            }
            CMD_READ_CTR => self.push_output(self.control),
            CMD_WRITE_CTR => self.pending_command = Some(cmd),
            CMD_SELF_TEST => self.push_output(0x55),
            _ => log::debug!("i8042: ignored command {cmd:#x}"),
        }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => {
                self.status &= !STATUS_OUTPUT_FULL;
                self.output.take().unwrap_or(0)
            }
            COMMAND_OFFSET => self.status,
            _ => 0xff,
        };
        data.fill(0);
        data[0] = value;
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            COMMAND_OFFSET => self.command(byte),
            DATA_OFFSET => {
                self.status &= !STATUS_COMMAND;
                if self.pending_command.take() == Some(CMD_WRITE_CTR) {
                    self.control = byte;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_the_vmm() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn status_reports_an_empty_input_buffer() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt);
        let mut b = [0u8; 1];
        dev.read(COMMAND_OFFSET, &mut b);
        assert_eq!(
            b[0] & 0x02,
            0,
            "input buffer must read as empty so the guest can write"
        );
    }

    #[test]
    fn control_byte_round_trips() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        let mut b = [0u8; 1];
        dev.read(COMMAND_OFFSET, &mut b);
        assert_ne!(b[0] & STATUS_OUTPUT_FULL, 0);
        dev.read(DATA_OFFSET, &mut b);
        assert_eq!(b[0], 0x47);
    }
}
