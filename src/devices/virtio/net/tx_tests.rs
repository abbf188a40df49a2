//! Transmit (queue 1): frames from the driver's chains to the fake tap.

use vm_memory::{Bytes, GuestAddress};

use super::*;

#[test]
fn transmit_sends_the_frame_behind_a_zeroed_header() {
    let mut r = rig();
    let f = frame(60, 1);
    // A header asking for checksum and segmentation offloads never negotiated.
    let mut bytes = vec![1, 1, 54, 0, 0xb4, 0x05, 34, 0, 16, 0, 0, 0];
    bytes.extend_from_slice(&f);
    r.transmit(&bytes, bytes.len());

    let sent = r.peer_recv().expect("no frame reached the tap");
    assert_eq!(sent[..VNET_HDR_LEN], HEADER_ZERO);
    assert_eq!(sent[VNET_HDR_LEN..], f[..]);
    assert_eq!(r.txq.used_idx(&r.mem), 1);
    assert_eq!(r.txq.used_elem(&r.mem, 0).1, 0);
    assert!(r.irq.take().contains(&INTERRUPT_VRING));
    let c = r.counters();
    assert_eq!((c.tx_frames, c.tx_bytes, c.tx_dropped), (1, 60, 0));
}

#[test]
fn transmit_sends_several_frames_in_order_whatever_their_descriptors() {
    let mut r = rig();
    let frames = [frame(1514, 2), frame(14, 3), frame(9000, 4)];
    for (f, piece) in frames.iter().zip([VNET_HDR_LEN + 1514, 5, 1000]) {
        let mut bytes = HEADER_ZERO.to_vec();
        bytes.extend_from_slice(f);
        r.transmit(&bytes, piece);
    }
    for f in &frames {
        let sent = r.peer_recv().expect("frame missing");
        assert_eq!(sent[VNET_HDR_LEN..], f[..]);
    }
    assert_eq!(r.peer_recv(), None);
    assert_eq!(r.txq.used_idx(&r.mem), 3);
    assert_eq!(r.counters().tx_bytes, 1514 + 14 + 9000);
}

#[test]
fn transmit_drops_chains_it_cannot_send_and_still_returns_them() {
    let mut r = rig();
    r.mem.write_slice(&[0; 64], GuestAddress(TX_BUFS)).unwrap();
    // A writable buffer, a chain shorter than the headers, one longer than any frame.
    let chains: [&[(u64, u32, bool)]; 3] = [
        &[(TX_BUFS, 12, false), (TX_BUFS + 12, 60, true)],
        &[(TX_BUFS, 25, false)],
        &[(TX_BUFS, MAX_FRAME_LEN as u32 + 1, false)],
    ];
    for chain in chains {
        r.txq.add_chain(&r.mem, chain);
    }
    r.t.notify_queue(1);
    assert_eq!(r.peer_recv(), None);
    assert_eq!(r.txq.used_idx(&r.mem), 3);
    for i in 0..3 {
        assert_eq!(r.txq.used_elem(&r.mem, i).1, 0);
    }
    assert!(r.t.is_running());

    let mut bytes = HEADER_ZERO.to_vec();
    bytes.extend_from_slice(&frame(100, 5));
    r.transmit(&bytes, 40);
    assert_eq!(r.peer_recv().unwrap()[VNET_HDR_LEN..], frame(100, 5)[..]);
    let c = r.counters();
    assert_eq!((c.tx_frames, c.tx_dropped, c.tx_errors), (1, 3, 0));
}

#[test]
fn frame_the_tap_refuses_is_dropped_and_its_chain_returned() {
    let (device_end, peer) = seqpacket_pair();
    let net = Net::with_backend(&config(), Box::new(RefusingTap(device_end)));
    let features = net.features();
    let mut r = rig_on(net, peer, features);
    let mut bytes = HEADER_ZERO.to_vec();
    bytes.extend_from_slice(&frame(60, 6));
    r.transmit(&bytes, bytes.len());
    r.transmit(&bytes, bytes.len());
    assert_eq!(r.txq.used_idx(&r.mem), 2);
    assert!(r.t.is_running());
    let c = r.counters();
    assert_eq!((c.tx_frames, c.tx_dropped, c.tx_errors), (0, 2, 2));
}

#[test]
fn looping_transmit_chain_stops_the_device() {
    let mut r = rig();
    DriverQueue::write_desc(&r.mem, r.txq.desc, 0, (TX_BUFS, 64, DESC_F_NEXT, 0));
    r.txq.publish(&r.mem, 0);
    r.t.notify_queue(1);
    assert!(r.t.needs_reset());
    assert_eq!(r.peer_recv(), None);
}
