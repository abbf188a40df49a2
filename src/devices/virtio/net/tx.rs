//! Transmit: frames from the driver's transmit queue (queue 1) to the backend.
//!
//! Each chain's device-readable bytes are a header and an Ethernet frame. The frame goes
//! to the backend in one gathering write straight from guest memory, behind a header of
//! zeros (see [`super`] for why). The device writes nothing into the chain, so every chain
//! returns with a used length of 0, whether its frame was sent or dropped.

use super::backend::TxFrame;
use super::{worth_logging, Backend, Net, NetCounters, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::devices::virtio::queue::{drain, split_at, total_len, Chain, QueueError};
use crate::devices::virtio::{Memory, Queue};

/// What goes to the backend in place of the driver's header.
static TX_HEADER: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
/// The shortest frame a tap takes: a header and an Ethernet header.
const MIN_LEN: u64 = (VNET_HDR_LEN + 14) as u64;
/// `writev` takes at most this many pieces (`UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// Why a frame from the driver was dropped without reaching the backend.
#[derive(Debug, thiserror::Error)]
enum TxDrop {
    #[error("the chain has device-writable buffers")]
    Writable,
    #[error("the chain holds {0} bytes, fewer than a header and an Ethernet header ({MIN_LEN})")]
    Short(u64),
    #[error("the chain holds {0} bytes, more than the largest frame ({MAX_FRAME_LEN})")]
    Long(u64),
    #[error("the frame cannot be gathered from guest memory in {MAX_IOVECS} pieces or fewer")]
    Fragmented,
}

impl Net {
    pub(super) fn process_tx(
        &mut self,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError> {
        let backend = self.backend.as_mut();
        let counters = &mut self.counters;
        let name = self.name.as_str();
        drain(queue, mem, |chain| {
            send(backend, chain, mem, counters, name);
            0
        })
    }
}

fn send(
    backend: &mut dyn Backend,
    chain: &Chain,
    mem: &Memory,
    counters: &mut NetCounters,
    name: &str,
) {
    let frame = match gather(chain, mem) {
        Ok(frame) => frame,
        Err(why) => {
            counters.tx_dropped += 1;
            log::debug!("{name}: dropped a frame from the driver: {why}");
            return;
        }
    };
    match backend.write_frame(&frame) {
        Ok(_) => {
            counters.tx_frames += 1;
            counters.tx_bytes += (frame.len() - VNET_HDR_LEN) as u64;
        }
        Err(e) => {
            counters.tx_dropped += 1;
            counters.tx_errors += 1;
            if worth_logging(counters.tx_errors) {
                let hint = match e.raw_os_error() {
                    Some(libc::EIO) => " (the tap is down? `ip link set <tap> up`)",
                    _ => "",
                };
                log::warn!(
                    "{name}: the tap refused a frame, dropped ({} so far): {e}{hint}",
                    counters.tx_errors
                );
            }
        }
    }
}

/// The frame in `chain` behind [`TX_HEADER`], or why it cannot be sent.
fn gather<'a>(chain: &Chain, mem: &'a Memory) -> Result<TxFrame<'a>, TxDrop> {
    if !chain.writable.is_empty() {
        return Err(TxDrop::Writable);
    }
    let len = total_len(&chain.readable);
    if len < MIN_LEN {
        return Err(TxDrop::Short(len));
    }
    if len > MAX_FRAME_LEN as u64 {
        return Err(TxDrop::Long(len));
    }
    let (_, frame) = split_at(&chain.readable, VNET_HDR_LEN as u64);
    TxFrame::gather(&TX_HEADER, &frame, mem, MAX_IOVECS).ok_or(TxDrop::Fragmented)
}
