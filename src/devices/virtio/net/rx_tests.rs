//! Receive (queue 0): frames from the fake tap into the driver's buffers.

use vm_memory::{Bytes, GuestAddress};

use super::*;

#[test]
fn receive_delivers_a_frame_with_the_used_length_of_header_and_frame() {
    let mut r = rig();
    r.post_rx(2, RX_BUF_LEN);
    let f = frame(1514, 7);
    r.peer_send(&f);
    r.t.notify_queue(0);

    assert_eq!(r.rxq.used_idx(&r.mem), 1);
    let got = r.received(0);
    assert_eq!(got.len(), VNET_HDR_LEN + 1514);
    assert_eq!(got[..VNET_HDR_LEN], HEADER_RX);
    assert_eq!(got[VNET_HDR_LEN..], f[..]);
    assert!(r.irq.take().contains(&INTERRUPT_VRING));
    let c = r.counters();
    assert_eq!((c.rx_frames, c.rx_bytes, c.rx_dropped), (1, 1514, 0));
}

#[test]
fn receive_fills_a_buffer_split_over_several_descriptors() {
    let mut r = rig();
    let bufs = [
        (RX_BUFS, 10, true),
        (RX_BUFS + 10, 7, true),
        (RX_BUFS + 17, 200, true),
    ];
    r.rxq.add_chain(&r.mem, &bufs);
    r.peer_send(&frame(100, 8));
    r.t.notify_queue(0);
    let (_, len) = r.rxq.used_elem(&r.mem, 0);
    assert_eq!(len, 112);
    let mut got = vec![0; 112];
    r.mem.read_slice(&mut got, GuestAddress(RX_BUFS)).unwrap();
    assert_eq!(got[..VNET_HDR_LEN], HEADER_RX);
    assert_eq!(got[VNET_HDR_LEN..], frame(100, 8)[..]);
}

#[test]
fn receive_without_buffers_leaves_frames_in_the_tap_until_buffers_come() {
    let mut r = rig();
    r.peer_send(&frame(60, 9));
    r.peer_send(&frame(70, 10));
    r.t.notify_queue(0); // the tap became readable; no buffer yet
    assert_eq!(r.waiting_in_tap(), Some(VNET_HDR_LEN + 60));
    assert_eq!(r.rxq.used_idx(&r.mem), 0);

    r.post_rx(2, RX_BUF_LEN);
    r.t.notify_queue(0); // the driver's notification
    assert_eq!(r.rxq.used_idx(&r.mem), 2);
    assert_eq!(r.received(0)[VNET_HDR_LEN..], frame(60, 9)[..]);
    assert_eq!(r.received(1)[VNET_HDR_LEN..], frame(70, 10)[..]);
    assert_eq!(r.waiting_in_tap(), None);
    assert_eq!(r.counters().rx_dropped, 0);
}

#[test]
fn receive_out_of_buffers_asks_the_driver_to_notify_on_the_next_one() {
    let mut r = rig();
    assert_ne!(r.t.device().acked_features & FEATURE_RING_EVENT_IDX, 0);
    r.post_rx(1, RX_BUF_LEN);
    for seed in 0..3 {
        r.peer_send(&frame(60, seed));
    }
    r.t.notify_queue(0);
    assert_eq!(r.rxq.used_idx(&r.mem), 1);
    // avail_event, after the used ring: notify when available entry 1 is published.
    let avail_event = GuestAddress(r.rxq.used + 4 + 8 * u64::from(QUEUE_SIZE));
    assert_eq!(r.mem.read_obj::<u16>(avail_event).unwrap(), 1);
    assert_eq!(r.waiting_in_tap(), Some(VNET_HDR_LEN + 60));

    r.post_rx(2, RX_BUF_LEN);
    r.t.notify_queue(0);
    assert_eq!(r.rxq.used_idx(&r.mem), 3);
    assert_eq!(r.received(2)[VNET_HDR_LEN..], frame(60, 2)[..]);
    assert_eq!(r.mem.read_obj::<u16>(avail_event).unwrap(), 3);
}

#[test]
fn frame_larger_than_the_buffer_is_dropped_and_counted() {
    let mut r = rig();
    r.post_rx(2, RX_BUF_LEN);
    r.peer_send(&frame(2000, 11));
    r.peer_send(&frame(80, 12));
    r.t.notify_queue(0);
    assert_eq!(r.rxq.used_idx(&r.mem), 2);
    assert_eq!(r.rxq.used_elem(&r.mem, 0).1, 0);
    assert_eq!(r.received(1)[VNET_HDR_LEN..], frame(80, 12)[..]);
    let c = r.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 1));
}

#[test]
fn frame_larger_than_any_frame_is_dropped_without_using_a_buffer() {
    let mut r = rig();
    r.post_rx(1, 0x1_0000);
    r.peer_send(&frame(MAX_FRAME_LEN + 100, 13));
    r.peer_send(&frame(80, 14));
    r.t.notify_queue(0);
    assert_eq!(r.rxq.used_idx(&r.mem), 1);
    assert_eq!(r.received(0)[VNET_HDR_LEN..], frame(80, 14)[..]);
    assert_eq!(r.counters().rx_dropped, 1);
}

#[test]
fn broken_receive_chain_stops_the_device_and_reset_drops_the_held_frame() {
    let mut r = rig();
    r.rxq
        .add_chain(&r.mem, &[(MEM_SIZE as u64 - 16, 1530, true)]);
    r.peer_send(&frame(60, 15));
    r.t.notify_queue(0);
    assert!(r.t.needs_reset());
    assert_ne!(
        read_reg(&mut r.t, reg::STATUS) & STATUS_DEVICE_NEEDS_RESET,
        0
    );
    assert_eq!(r.t.device().rx_pending, Some(VNET_HDR_LEN + 60));

    write_reg(&mut r.t, reg::STATUS, 0);
    assert_eq!(r.t.device().rx_pending, None);
    assert_eq!(r.t.device().acked_features, 0);
    assert_eq!(r.counters().rx_dropped, 1);

    let features = r.t.device().features();
    let queues = [
        DriverQueue::new(QUEUE_SIZE, 0x3_0000),
        DriverQueue::new(QUEUE_SIZE, 0x4_0000),
    ];
    start(&mut r.t, &queues, features);
    [r.rxq, r.txq] = queues;
    r.peer_send(&frame(70, 16));
    r.post_rx(1, RX_BUF_LEN);
    r.t.notify_queue(0);
    assert_eq!(r.rxq.used_idx(&r.mem), 1);
    assert_eq!(r.received(0)[VNET_HDR_LEN..], frame(70, 16)[..]);
}

#[test]
fn receive_after_restore_picks_up_frames_queued_while_saved() {
    let mut r = rig();
    r.post_rx(2, RX_BUF_LEN);
    let net_state = r.t.device().state();
    let transport_state = r.t.save();

    let (net, peer) = net_with_peer();
    let mut t = MmioTransport::restore(net, r.mem.clone(), r.irq.clone(), &transport_state)
        .expect("restore");
    assert_eq!(t.device().state(), net_state);
    r.peer = peer;
    r.peer_send(&frame(90, 17));
    t.process_after_resume();
    assert_eq!(r.rxq.used_idx(&r.mem), 1);
    assert_eq!(r.received(0)[VNET_HDR_LEN..], frame(90, 17)[..]);
}
