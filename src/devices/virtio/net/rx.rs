//! Receive: frames from the backend into the driver's receive buffers (queue 0).
//!
//! See the module documentation of [`super`] for the contract with the event loop. A frame
//! is read from the backend only after the available ring shows a buffer for it; it goes
//! into the buffer's device-writable part (readable descriptors in a receive chain are
//! ignored), behind a fresh header whose `num_buffers` is 1, as the specification requires
//! without `VIRTIO_NET_F_MRG_RXBUF` (5.1.6.4.1).

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::{worth_logging, Net, VNET_HDR_LEN};
use crate::devices::virtio::queue::{pop_chain, total_len, Chain, QueueError};
use crate::devices::virtio::{Memory, Queue};

/// The header of every received frame: no checksum flags, no segmentation, one buffer.
const RX_HEADER: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

impl Net {
    pub(super) fn process_rx(
        &mut self,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError> {
        let mut used_any = false;
        loop {
            if !has_available(queue, mem)? {
                // The tap's edge-triggered readiness will not fire again for frames already
                // queued, so ask the driver to notify when it posts the next buffer. One
                // posted in the meantime is taken now.
                if queue.enable_notification(mem).map_err(QueueError::Ring)? {
                    continue;
                }
                return Ok(used_any);
            }
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.read_frame() {
                    Some(len) => len,
                    None => return Ok(used_any),
                },
            };
            // Held until it is delivered, should the chain turn out to break the queue.
            self.rx_pending = Some(len);
            let Some(chain) = pop_chain(queue, mem)? else {
                // The driver moved its available index back; keep the frame for later.
                return Ok(used_any);
            };
            self.rx_pending = None;
            let written = self.deliver(&chain, len, mem);
            queue
                .add_used(mem, chain.head, written)
                .map_err(QueueError::Ring)?;
            used_any = true;
        }
    }

    /// Reads the next usable frame into `rx_buf`; `None` when the backend has none left.
    /// Frames that cannot be delivered to any buffer are dropped here.
    fn read_frame(&mut self) -> Option<usize> {
        loop {
            match self.backend.read_frame(&mut self.rx_buf) {
                Ok(0) => return None,
                Ok(len) if len <= VNET_HDR_LEN || len > self.rx_buf.len() => {
                    self.counters.rx_dropped += 1;
                    if worth_logging(self.counters.rx_dropped) {
                        log::warn!(
                            "{}: dropped a {len}-byte frame from the tap, outside \
                             {}..={} bytes with its header ({} dropped so far)",
                            self.name,
                            VNET_HDR_LEN + 1,
                            self.rx_buf.len(),
                            self.counters.rx_dropped
                        );
                    }
                }
                Ok(len) => return Some(len),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    self.counters.rx_errors += 1;
                    if worth_logging(self.counters.rx_errors) {
                        log::warn!(
                            "{}: cannot read from the tap ({} failures so far): {e}",
                            self.name,
                            self.counters.rx_errors
                        );
                    }
                    return None;
                }
            }
        }
    }

    /// Copies the frame of `len` bytes in `rx_buf` into `chain` behind [`RX_HEADER`].
    /// Returns the used length: the whole frame, or 0 when it was dropped.
    fn deliver(&mut self, chain: &Chain, len: usize, mem: &Memory) -> u32 {
        let space = total_len(&chain.writable);
        if len as u64 > space {
            self.counters.rx_dropped += 1;
            if worth_logging(self.counters.rx_dropped) {
                log::warn!(
                    "{}: dropped a {len}-byte frame (with its header) that does not fit the \
                     driver's {space}-byte receive buffer; is the tap's MTU larger than the \
                     guest's? ({} dropped so far)",
                    self.name,
                    self.counters.rx_dropped
                );
            }
            return 0;
        }
        let frame = &mut self.rx_buf[..len];
        frame[..VNET_HDR_LEN].copy_from_slice(&RX_HEADER);
        let mut at = 0;
        for buf in &chain.writable {
            if at == len {
                break;
            }
            let n = (buf.len as usize).min(len - at);
            // pop_chain checked the buffer lies in guest RAM.
            if let Err(e) = mem.write_slice(&frame[at..at + n], buf.addr) {
                self.counters.rx_dropped += 1;
                log::warn!("{}: cannot write a frame to guest memory: {e}", self.name);
                return 0;
            }
            at += n;
        }
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += (len - VNET_HDR_LEN) as u64;
        // `len` <= MAX_FRAME_LEN.
        len as u32
    }
}

/// Whether the driver has made a chain available that the device has not taken, without
/// taking it. An available index more than a ring ahead breaks the queue, as in
/// [`pop_chain`].
fn has_available(queue: &Queue, mem: &Memory) -> Result<bool, QueueError> {
    let avail_idx = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(QueueError::Ring)?;
    let next_avail = queue.next_avail();
    let size = queue.size();
    let ready = (avail_idx - Wrapping(next_avail)).0;
    if ready > size {
        return Err(QueueError::AvailIndexOutOfRange {
            avail_idx: avail_idx.0,
            next_avail,
            size,
        });
    }
    Ok(ready != 0)
}
