//! Descriptor chains taken from a split virtqueue and checked before a device touches them.
//!
//! The `virtio-queue` crate walks the rings; its chain iterator stops silently at a bad
//! descriptor. This module turns every such stop into a [`QueueError`] (the driver broke the
//! queue protocol, so the device must be reset) and hands devices a [`Chain`]: the head
//! index and the device-readable and device-writable buffers, each known to lie in guest
//! RAM. What the buffers mean is the device's business.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemory, Permissions};

use super::{Memory, Queue};

/// The driver broke the virtqueue protocol; the device cannot go on with this queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "the available ring index {avail_idx} is more than the queue size {size} ahead of \
         the next entry the device expects ({next_avail})"
    )]
    AvailIndexOutOfRange {
        avail_idx: u16,
        next_avail: u16,
        size: u16,
    },
    #[error("the available ring names descriptor {head}, outside the table of {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error(
        "the descriptor chain at head {head} breaks off after {descriptors} descriptors \
         (a next index past the table, a loop, or a bad indirect table)"
    )]
    UnterminatedChain { head: u16, descriptors: usize },
    #[error(
        "descriptor chain at head {head} has a buffer at {addr:#x} of {len} bytes outside \
         guest RAM"
    )]
    BufferOutsideMemory { head: u16, addr: u64, len: u32 },
    #[error("cannot access the rings of the queue in guest memory")]
    Ring(#[source] virtio_queue::Error),
}

/// A guest buffer of a descriptor chain; the whole range is in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A descriptor chain the device has taken from the available ring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    /// Buffers the device reads, in chain order.
    pub readable: Vec<Buffer>,
    /// Buffers the device writes, in chain order.
    pub writable: Vec<Buffer>,
    /// A device-readable buffer came after a device-writable one, which the specification
    /// forbids (section 2.7.4.2); devices answer such a request with an error.
    pub misordered: bool,
}

impl Chain {
    pub fn descriptors(&self) -> usize {
        self.readable.len() + self.writable.len()
    }
}

/// Total length of `buffers` in bytes.
pub fn total_len(buffers: &[Buffer]) -> u64 {
    buffers.iter().map(|b| u64::from(b.len)).sum()
}

/// Splits `buffers` into the first `at` bytes and the rest, cutting a buffer in two where
/// `at` falls inside it. `at` past the end gives everything and nothing.
pub fn split_at(buffers: &[Buffer], at: u64) -> (Vec<Buffer>, Vec<Buffer>) {
    let mut front = Vec::new();
    let mut back = Vec::new();
    let mut left = at;
    for &buf in buffers {
        let len = u64::from(buf.len);
        if left >= len {
            front.push(buf);
            left -= len;
        } else if left == 0 {
            back.push(buf);
        } else {
            // `left` < `len` <= u32::MAX here, and the range is inside guest RAM.
            let cut = left as u32;
            front.push(Buffer {
                addr: buf.addr,
                len: cut,
            });
            back.push(Buffer {
                addr: buf.addr.unchecked_add(u64::from(cut)),
                len: buf.len - cut,
            });
            left = 0;
        }
    }
    (front, back)
}

/// Takes the next chain the driver made available, or `None` when there is none.
pub fn pop_chain(queue: &mut Queue, mem: &Memory) -> Result<Option<Chain>, QueueError> {
    let size = queue.size();
    let next_avail = queue.next_avail();
    let chain = match queue.iter(mem) {
        Ok(mut iter) => iter.next(),
        Err(virtio_queue::Error::InvalidAvailRingIndex) => {
            let avail_idx = queue
                .avail_idx(mem, Ordering::Relaxed)
                .map_err(QueueError::Ring)?;
            return Err(QueueError::AvailIndexOutOfRange {
                avail_idx: avail_idx.0,
                next_avail,
                size,
            });
        }
        Err(e) => return Err(QueueError::Ring(e)),
    };
    let Some(chain) = chain else {
        return Ok(None);
    };

    let head = chain.head_index();
    if head >= size {
        return Err(QueueError::HeadOutOfRange { head, size });
    }
    let mut out = Chain {
        head,
        ..Chain::default()
    };
    let mut last_has_next = true;
    for desc in chain {
        last_has_next = desc.has_next();
        let buf = Buffer {
            addr: desc.addr(),
            len: desc.len(),
        };
        if !mem.check_range(buf.addr, buf.len as usize, Permissions::ReadWrite) {
            return Err(QueueError::BufferOutsideMemory {
                head,
                addr: buf.addr.raw_value(),
                len: buf.len,
            });
        }
        if desc.is_write_only() {
            out.writable.push(buf);
        } else {
            out.misordered |= !out.writable.is_empty();
            out.readable.push(buf);
        }
    }
    // The crate's iterator ends early, without an error, at an unreadable descriptor, a
    // next index past the table, a chain longer than the table (a loop) or a bad indirect
    // table; a chain that really ended has a last descriptor without NEXT.
    if last_has_next {
        return Err(QueueError::UnterminatedChain {
            head,
            descriptors: out.descriptors(),
        });
    }
    Ok(Some(out))
}

/// Hands every available chain to `handle` and returns each to the driver in the used ring
/// with the byte count `handle` returns (what the device wrote into the chain). Returns
/// whether any chain was used.
///
/// Driver notifications are suppressed while the queue is drained and re-enabled before
/// returning; a chain published in between is picked up here rather than lost.
pub fn drain<F>(queue: &mut Queue, mem: &Memory, mut handle: F) -> Result<bool, QueueError>
where
    F: FnMut(&Chain) -> u32,
{
    let mut used_any = false;
    loop {
        queue.disable_notification(mem).map_err(QueueError::Ring)?;
        while let Some(chain) = pop_chain(queue, mem)? {
            let written = handle(&chain);
            queue
                .add_used(mem, chain.head, written)
                .map_err(QueueError::Ring)?;
            used_any = true;
        }
        if !queue.enable_notification(mem).map_err(QueueError::Ring)? {
            return Ok(used_any);
        }
    }
}

/// The number of chains the device took but has not returned: `next_avail - next_used`.
pub fn in_flight(queue: &Queue) -> u16 {
    (Wrapping(queue.next_avail()) - Wrapping(queue.next_used())).0
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
