//! The 16550 UART at 0x3f8 (IRQ 4), built on vm-superio, with an output path that never
//! blocks a vCPU and an input path fed from the VMM's stdin.
//!
//! Output bytes go to a bounded in-memory queue drained by a writer thread: a slow
//! terminal or a full pipe stalls only that thread. When the queue is full, bytes are
//! dropped and counted rather than stalling the guest. Input is read from stdin by the
//! event loop only while the UART's receive FIFO has room, so no byte is lost.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{lock, PioDevice};
use crate::vmm::config::SerialMode;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
pub const COM1_IRQ: u32 = 4;
/// Bytes the output queue holds before it starts dropping.
const OUTPUT_QUEUE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot open serial output file {path}")]
    OpenFile {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot start the serial output thread")]
    Thread(#[source] io::Error),
}

/// Raises the UART's interrupt through an eventfd bound to its GSI with irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the event loop when the guest has drained the receive FIFO.
pub struct InputEvents {
    input_ready: EventFd,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.input_ready.write(1) {
            log::warn!("serial: cannot signal that the input FIFO drained: {e}");
        }
    }
}

#[derive(Default)]
struct Queue {
    bytes: VecDeque<u8>,
    closed: bool,
}

/// The vCPU-side writer: appends to the queue and returns at once.
pub struct SerialOut {
    shared: Option<Arc<(Mutex<Queue>, Condvar)>>,
    dropped: Arc<AtomicU64>,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(shared) = &self.shared else {
            return Ok(buf.len());
        };
        let (queue, ready) = &**shared;
        let mut q = lock(queue);
        let room = OUTPUT_QUEUE_BYTES.saturating_sub(q.bytes.len());
        let taken = room.min(buf.len());
        q.bytes.extend(&buf[..taken]);
        if taken < buf.len() {
            let lost = (buf.len() - taken) as u64;
            if self.dropped.fetch_add(lost, Ordering::Relaxed) == 0 {
                log::warn!("serial output is not being read fast enough; dropping bytes");
            }
        }
        ready.notify_one();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Owns the writer thread; `finish` drains what the guest wrote and stops it.
pub struct OutputPump {
    shared: Option<Arc<(Mutex<Queue>, Condvar)>>,
    thread: Option<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
}

impl OutputPump {
    /// Waits (up to `timeout`) until everything the guest wrote so far is written out.
    pub fn drain(&self, timeout: std::time::Duration) {
        let Some(shared) = &self.shared else { return };
        let deadline = std::time::Instant::now() + timeout;
        while !lock(&shared.0).bytes.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    pub fn finish(&mut self) {
        if let Some(shared) = &self.shared {
            lock(&shared.0).closed = true;
            shared.1.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            log::warn!("serial: {dropped} output bytes were dropped");
        }
    }
}

impl Drop for OutputPump {
    fn drop(&mut self) {
        self.finish();
    }
}

fn pump(shared: Arc<(Mutex<Queue>, Condvar)>, mut sink: Box<dyn Write + Send>) {
    let (queue, ready) = &*shared;
    loop {
        let chunk: Vec<u8> = {
            let mut q = lock(queue);
            while q.bytes.is_empty() && !q.closed {
                q = ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.bytes.is_empty() && q.closed {
                break;
            }
            q.bytes.drain(..).collect()
        };
        if sink.write_all(&chunk).and_then(|_| sink.flush()).is_err() {
            // The reader went away (closed pipe): keep draining so the guest never stalls.
            continue;
        }
    }
}

/// Builds the writer pair for a serial mode.
pub fn output_for(mode: &SerialMode) -> Result<(SerialOut, OutputPump), SerialError> {
    let dropped = Arc::new(AtomicU64::new(0));
    let sink: Box<dyn Write + Send> = match mode {
        SerialMode::Null => {
            let out = SerialOut {
                shared: None,
                dropped: dropped.clone(),
            };
            return Ok((
                out,
                OutputPump {
                    shared: None,
                    thread: None,
                    dropped,
                },
            ));
        }
        SerialMode::Stdio => Box::new(io::stdout()),
        SerialMode::File { path } => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| SerialError::OpenFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    };
    let shared = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("serial-out".into())
        .spawn(move || pump(thread_shared, sink))
        .map_err(SerialError::Thread)?;
    let out = SerialOut {
        shared: Some(shared.clone()),
        dropped: dropped.clone(),
    };
    Ok((
        out,
        OutputPump {
            shared: Some(shared),
            thread: Some(thread),
            dropped,
        },
    ))
}

/// Every UART register and the bytes waiting in its receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The receive FIFO's size.
const FIFO_SIZE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    #[error(
        "saved serial state has {0} bytes in its receive FIFO, more than the {FIFO_SIZE} it holds"
    )]
    FifoOverflow(usize),
    #[error("cannot rebuild the UART from its saved state: {0}")]
    Rebuild(String),
}

/// The UART as seen from the port I/O bus.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, InputEvents, SerialOut>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, input_ready: EventFd, out: SerialOut) -> Self {
        let events = InputEvents { input_ready };
        SerialDevice {
            uart: Serial::with_events(IrqTrigger(irq), events, out),
        }
    }

    /// Rebuilds the UART from a saved state. vm-superio raises an enabled interrupt that
    /// was pending when the state was saved again (its edge went to the old VM's
    /// irqchip); a test below holds it to that.
    pub fn from_state(
        irq: EventFd,
        input_ready: EventFd,
        out: SerialOut,
        state: &SerialDeviceState,
    ) -> Result<Self, SerialStateError> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(SerialStateError::FifoOverflow(state.in_buffer.len()));
        }
        let raw = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let events = InputEvents { input_ready };
        let uart = Serial::from_state(&raw, IrqTrigger(irq), events, out)
            .map_err(|e| SerialStateError::Rebuild(format!("{e:?}")))?;
        Ok(SerialDevice { uart })
    }

    /// The UART's registers and FIFO.
    pub fn state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queues input bytes for the guest; returns how many fitted in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(&byte) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, byte) {
                log::warn!("serial: register write failed: {e:?}");
            }
        }
    }
}

/// Event-loop subscriber moving stdin bytes into the UART's receive FIFO, pausing
/// stdin while the FIFO is full.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    input_fd: RawFd,
    input_ready: EventFd,
    pending: Vec<u8>,
    watching_input: bool,
    input_open: bool,
}

impl SerialInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input_fd: RawFd, input_ready: EventFd) -> Self {
        SerialInput {
            serial,
            input_fd,
            input_ready,
            pending: Vec::new(),
            watching_input: false,
            input_open: true,
        }
    }

    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = lock(&self.serial).enqueue_input(&self.pending);
        self.pending.drain(..n);
    }

    fn set_watch(&mut self, ops: &mut EventOps, watch: bool) {
        if watch == self.watching_input || !self.input_open {
            return;
        }
        let events = Events::new_raw(self.input_fd, EventSet::IN);
        let result = if watch {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.watching_input = watch,
            Err(e) => {
                // stdin that cannot be polled (a regular file, /dev/null) gives no input.
                log::debug!("serial: stdin is not pollable ({e:?}); serial input disabled");
                self.input_open = false;
            }
        }
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is a valid writable buffer of the length passed; the descriptor
        // is the VMM's stdin, which stays open for the process lifetime.
        let n = unsafe { libc::read(self.input_fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock && err.kind() != io::ErrorKind::Interrupted {
                log::warn!("serial: reading stdin failed: {err}; serial input disabled");
                self.set_watch(ops, false);
                self.input_open = false;
            }
            return;
        }
        if n == 0 {
            log::debug!("serial: stdin reached end of file");
            self.set_watch(ops, false);
            self.input_open = false;
            return;
        }
        self.pending.extend_from_slice(&buf[..n as usize]);
        self.flush_pending();
        if !self.pending.is_empty() {
            self.set_watch(ops, false);
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input_ready, EventSet::IN)) {
            log::warn!("serial: cannot watch the input-ready event: {e:?}");
        }
        self.set_watch(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.input_ready.as_raw_fd() {
            let _ = self.input_ready.read();
            self.flush_pending();
            if self.pending.is_empty() {
                self.set_watch(ops, true);
            }
        } else if events.fd() == self.input_fd {
            if events.event_set().intersects(EventSet::IN) {
                self.read_input(ops);
            } else {
                self.set_watch(ops, false);
                self.input_open = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (SerialDevice, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (out, _pump) = output_for(&SerialMode::Null).unwrap();
        (SerialDevice::new(irq.try_clone().unwrap(), ready, out), irq)
    }

    #[test]
    fn output_to_a_file_arrives_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        let (mut out, mut pump) = output_for(&SerialMode::File { path: path.clone() }).unwrap();
        for b in b"hello, guest\n" {
            out.write_all(&[*b]).unwrap();
        }
        pump.finish();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello, guest\n");
    }

    #[test]
    fn input_beyond_the_fifo_is_not_accepted() {
        let (mut dev, _irq) = device();
        let taken = dev.enqueue_input(&[b'x'; 100]);
        assert_eq!(taken, 64, "the 16550 FIFO holds 64 bytes");
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }

    #[test]
    fn state_round_trips_with_fifo_bytes() {
        let (mut dev, _irq) = device();
        dev.write(3, &[0x03]); // LCR: 8N1
        dev.write(7, &[0x5a]); // scratch
        dev.enqueue_input(b"abc");
        let state = dev.state();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (out, _pump) = output_for(&SerialMode::Null).unwrap();
        let mut restored = SerialDevice::from_state(irq, ready, out, &state).unwrap();
        assert_eq!(restored.state(), state);
        let mut b = [0u8; 1];
        restored.read(0, &mut b);
        assert_eq!(b[0], b'a');
    }

    #[test]
    fn pending_transmit_interrupt_is_raised_again_after_restore() {
        let (mut dev, irq) = device();
        dev.write(1, &[0x02]); // IER: transmitter holding register empty
        dev.write(0, b"x"); // output a byte: THR-empty interrupt pending
        let _ = irq.read();
        let state = dev.state();
        assert_eq!(
            state.interrupt_identification & 0x01,
            0,
            "interrupt pending"
        );
        let new_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (out, _pump) = output_for(&SerialMode::Null).unwrap();
        let _restored =
            SerialDevice::from_state(new_irq.try_clone().unwrap(), ready, out, &state).unwrap();
        assert_eq!(
            new_irq.read().unwrap(),
            1,
            "the restored UART must raise its interrupt"
        );
    }

    #[test]
    fn oversized_saved_fifo_is_refused() {
        let (dev, _irq) = device();
        let mut state = dev.state();
        state.in_buffer = vec![0; 65];
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (out, _pump) = output_for(&SerialMode::Null).unwrap();
        assert!(SerialDevice::from_state(irq, ready, out, &state).is_err());
    }

    #[test]
    fn received_data_raises_the_interrupt_when_enabled() {
        let (mut dev, irq) = device();
        dev.write(1, &[0x01]); // IER: received data available
        dev.enqueue_input(b"a");
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8; 1];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
    }
}
