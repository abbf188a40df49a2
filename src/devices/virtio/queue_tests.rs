use virtio_queue::QueueState;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::testutil::{
    memory, DriverQueue, DATA, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MEM_SIZE,
};

const SIZE: u16 = 16;

fn queue_for(dq: &DriverQueue, event_idx: bool) -> Queue {
    Queue::try_from(QueueState {
        max_size: dq.size,
        size: dq.size,
        ready: true,
        desc_table: dq.desc,
        avail_ring: dq.avail,
        used_ring: dq.used,
        event_idx_enabled: event_idx,
        ..QueueState::default()
    })
    .unwrap()
}

fn setup() -> (Memory, DriverQueue, Queue) {
    let mem = memory();
    let dq = DriverQueue::new(SIZE, 0x1_0000);
    let q = queue_for(&dq, false);
    (mem, dq, q)
}

fn buf(addr: u64, len: u32) -> Buffer {
    Buffer {
        addr: GuestAddress(addr),
        len,
    }
}

#[test]
fn split_at_cuts_inside_a_buffer() {
    let bufs = [buf(0x100, 10), buf(0x200, 6)];
    let (front, back) = split_at(&bufs, 12);
    assert_eq!(front, vec![buf(0x100, 10), buf(0x200, 2)]);
    assert_eq!(back, vec![buf(0x202, 4)]);
}

#[test]
fn split_at_on_a_boundary_and_past_the_end() {
    let bufs = [buf(0x100, 10), buf(0x200, 6)];
    assert_eq!(split_at(&bufs, 10), (vec![bufs[0]], vec![bufs[1]]));
    assert_eq!(split_at(&bufs, 0), (vec![], bufs.to_vec()));
    assert_eq!(split_at(&bufs, 99), (bufs.to_vec(), vec![]));
    assert_eq!(total_len(&bufs), 16);
}

#[test]
fn pop_chain_returns_none_on_an_empty_ring() {
    let (mem, _dq, mut q) = setup();
    assert!(pop_chain(&mut q, &mem).unwrap().is_none());
}

#[test]
fn pop_chain_splits_buffers_by_direction() {
    let (mem, mut dq, mut q) = setup();
    let head = dq.add_chain(
        &mem,
        &[
            (DATA, 16, false),
            (DATA + 0x100, 512, true),
            (DATA + 0x400, 1, true),
        ],
    );
    let chain = pop_chain(&mut q, &mem).unwrap().unwrap();
    assert_eq!(chain.head, head);
    assert_eq!(chain.readable, vec![buf(DATA, 16)]);
    assert_eq!(
        chain.writable,
        vec![buf(DATA + 0x100, 512), buf(DATA + 0x400, 1)]
    );
    assert!(!chain.misordered);
    assert!(pop_chain(&mut q, &mem).unwrap().is_none());
}

#[test]
fn pop_chain_flags_a_readable_buffer_after_a_writable_one() {
    let (mem, mut dq, mut q) = setup();
    dq.add_chain(&mem, &[(DATA, 1, true), (DATA + 0x10, 16, false)]);
    assert!(pop_chain(&mut q, &mem).unwrap().unwrap().misordered);
}

#[test]
fn pop_chain_follows_an_indirect_table() {
    let (mem, mut dq, mut q) = setup();
    let table = DATA + 0x1000;
    DriverQueue::write_desc(&mem, table, 0, (DATA, 16, DESC_F_NEXT, 1));
    DriverQueue::write_desc(&mem, table, 1, (DATA + 0x100, 1, DESC_F_WRITE, 0));
    DriverQueue::write_desc(&mem, dq.desc, 0, (table, 32, DESC_F_INDIRECT, 0));
    dq.publish(&mem, 0);
    let chain = pop_chain(&mut q, &mem).unwrap().unwrap();
    assert_eq!(chain.readable, vec![buf(DATA, 16)]);
    assert_eq!(chain.writable, vec![buf(DATA + 0x100, 1)]);
}

#[test]
fn avail_index_too_far_ahead_is_an_error() {
    let (mem, dq, mut q) = setup();
    dq.set_avail_idx(&mem, SIZE + 1);
    let err = pop_chain(&mut q, &mem).unwrap_err();
    assert!(
        matches!(err, QueueError::AvailIndexOutOfRange { avail_idx: 17, .. }),
        "{err}"
    );
}

#[test]
fn head_index_outside_the_table_is_an_error() {
    let (mem, mut dq, mut q) = setup();
    dq.publish(&mem, SIZE + 3);
    let err = pop_chain(&mut q, &mem).unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::HeadOutOfRange {
                head: 19,
                size: SIZE
            }
        ),
        "{err}"
    );
}

#[test]
fn next_index_outside_the_table_is_an_error() {
    let (mem, mut dq, mut q) = setup();
    DriverQueue::write_desc(&mem, dq.desc, 0, (DATA, 16, DESC_F_NEXT, SIZE));
    dq.publish(&mem, 0);
    let err = pop_chain(&mut q, &mem).unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::UnterminatedChain {
                head: 0,
                descriptors: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn a_descriptor_loop_is_an_error_not_a_hang() {
    let (mem, mut dq, mut q) = setup();
    DriverQueue::write_desc(&mem, dq.desc, 0, (DATA, 16, DESC_F_NEXT, 1));
    DriverQueue::write_desc(&mem, dq.desc, 1, (DATA, 16, DESC_F_NEXT, 0));
    dq.publish(&mem, 0);
    let err = pop_chain(&mut q, &mem).unwrap_err();
    assert!(matches!(err, QueueError::UnterminatedChain { .. }), "{err}");
}

#[test]
fn a_buffer_outside_guest_memory_is_an_error() {
    let (mem, mut dq, mut q) = setup();
    dq.add_chain(&mem, &[(MEM_SIZE as u64 - 8, 16, false)]);
    let err = pop_chain(&mut q, &mem).unwrap_err();
    assert!(
        matches!(err, QueueError::BufferOutsideMemory { len: 16, .. }),
        "{err}"
    );
}

#[test]
fn drain_returns_every_chain_with_its_length() {
    let (mem, mut dq, mut q) = setup();
    let a = dq.add_chain(&mem, &[(DATA, 4, true)]);
    let b = dq.add_chain(&mem, &[(DATA + 0x10, 4, true)]);
    let mut seen = Vec::new();
    let used = drain(&mut q, &mem, |chain| {
        seen.push(chain.head);
        7
    })
    .unwrap();
    assert!(used);
    assert_eq!(seen, vec![a, b]);
    assert_eq!(dq.used_idx(&mem), 2);
    assert_eq!(dq.used_elem(&mem, 1), (u32::from(b), 7));
    assert_eq!(in_flight(&q), 0);
}

#[test]
fn drain_with_event_idx_asks_for_the_next_notification() {
    let mem = memory();
    let mut dq = DriverQueue::new(SIZE, 0x1_0000);
    let mut q = queue_for(&dq, true);
    dq.add_chain(&mem, &[(DATA, 4, true)]);
    assert!(drain(&mut q, &mem, |_| 0).unwrap());
    // avail_event sits after the used ring's entries; the driver notifies when it passes it.
    let avail_event: u16 = mem
        .read_obj(GuestAddress(dq.used + 4 + 8 * u64::from(SIZE)))
        .unwrap();
    assert_eq!(u16::from_le(avail_event), 1);
    assert!(!drain(&mut q, &mem, |_| 0).unwrap());
}
