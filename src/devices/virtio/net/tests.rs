//! Device tests against a fake tap: one end of an `AF_UNIX` `SOCK_SEQPACKET` pair, which
//! keeps frame boundaries like a tap. Receive and transmit tests live in `rx_tests.rs` and
//! `tx_tests.rs`; the real tap is tested in `tap_tests.rs`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::backend::writev_frame;
use super::*;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::testutil::{
    memory, read_reg, start, write_reg, DriverQueue, RecordingInterrupt, DESC_F_NEXT, MEM_SIZE,
};
use crate::devices::virtio::{INTERRUPT_VRING, STATUS_DEVICE_NEEDS_RESET};

const RX_BUFS: u64 = 0x8_0000;
const TX_BUFS: u64 = 0xc_0000;
/// What Linux posts without mergeable buffers: header plus a VLAN-tagged 1500-byte frame.
const RX_BUF_LEN: u32 = 12 + 1518;
const HEADER_ZERO: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
const HEADER_RX: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

/// A connected `SOCK_SEQPACKET` pair: (device end, test end).
fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let ret = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    assert_eq!(ret, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: socketpair succeeded, so both descriptors are open and ours alone.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// One frame from `fd` without blocking, with its full length (`MSG_TRUNC`).
fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    let flags = flags | libc::MSG_DONTWAIT | libc::MSG_TRUNC;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The device's end of the pair, standing in for a tap.
struct SocketTap(OwnedFd);

impl AsRawFd for SocketTap {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Backend for SocketTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv(self.0.as_raw_fd(), buf, 0)
    }

    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<usize> {
        writev_frame(self.0.as_raw_fd(), frame)
    }
}

/// A tap that refuses every frame, as a tap that is down does.
struct RefusingTap(OwnedFd);

impl AsRawFd for RefusingTap {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Backend for RefusingTap {
    fn read_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn write_frame(&mut self, _frame: &TxFrame<'_>) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
}

fn config() -> NetConfig {
    NetConfig {
        tap: "wbtest0".to_string(),
        mac: "52:54:00:12:34:56".parse().unwrap(),
    }
}

/// An Ethernet frame of `len` bytes to the test MAC; `seed` tells frames apart.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, seed, 0x08, 0x00,
    ];
    let header_len = f.len();
    f.extend((header_len..len).map(|i| seed.wrapping_mul(31).wrapping_add(i as u8)));
    f.truncate(len);
    f
}

struct Rig {
    t: MmioTransport<Net>,
    irq: Arc<RecordingInterrupt>,
    mem: Memory,
    rxq: DriverQueue,
    txq: DriverQueue,
    /// The test's end of the fake tap.
    peer: OwnedFd,
    rx_posted: u64,
    tx_at: u64,
}

/// A device on a fake tap, and the test's end of that tap.
fn net_with_peer() -> (Net, OwnedFd) {
    let (device_end, peer) = seqpacket_pair();
    let net = Net::with_backend(&config(), Box::new(SocketTap(device_end)));
    (net, peer)
}

/// A running device that negotiated every feature it offers.
fn rig() -> Rig {
    let (net, peer) = net_with_peer();
    let features = net.features();
    rig_on(net, peer, features)
}

fn rig_on(net: Net, peer: OwnedFd, features: u64) -> Rig {
    let mem = memory();
    let irq = RecordingInterrupt::new();
    let mut t = MmioTransport::new(net, mem.clone(), irq.clone());
    let queues = [
        DriverQueue::new(QUEUE_SIZE, 0x1_0000),
        DriverQueue::new(QUEUE_SIZE, 0x2_0000),
    ];
    start(&mut t, &queues, features);
    assert!(t.is_running());
    let [rxq, txq] = queues;
    Rig {
        t,
        irq,
        mem,
        rxq,
        txq,
        peer,
        rx_posted: 0,
        tx_at: TX_BUFS,
    }
}

impl Rig {
    /// Posts `count` receive buffers of `len` bytes, one descriptor each.
    fn post_rx(&mut self, count: u64, len: u32) {
        for _ in 0..count {
            let addr = RX_BUFS + self.rx_posted * 0x1_0000 % 0x4_0000;
            self.rxq.add_chain(&self.mem, &[(addr, len, true)]);
            self.rx_posted += 1;
        }
    }

    /// The `n`th frame the guest received (0-based), as the used ring reports it; the
    /// chain is one descriptor.
    fn received(&self, n: u16) -> Vec<u8> {
        let (head, len) = self.rxq.used_elem(&self.mem, n);
        let desc = GuestAddress(self.rxq.desc + 16 * u64::from(head));
        let addr: u64 = self.mem.read_obj(desc).unwrap();
        let mut out = vec![0; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    /// Puts `bytes` in guest memory cut into pieces of `piece` bytes, queues them as one
    /// transmit chain and notifies queue 1.
    fn transmit(&mut self, bytes: &[u8], piece: usize) {
        let mut bufs = Vec::new();
        for chunk in bytes.chunks(piece) {
            self.mem
                .write_slice(chunk, GuestAddress(self.tx_at))
                .unwrap();
            bufs.push((self.tx_at, chunk.len() as u32, false));
            self.tx_at += chunk.len() as u64;
        }
        self.txq.add_chain(&self.mem, &bufs);
        self.t.notify_queue(TX_QUEUE as u32);
    }

    /// The next frame the device wrote to the fake tap, if any.
    fn peer_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0; 2 * MAX_FRAME_LEN];
        match recv(self.peer.as_raw_fd(), &mut buf, 0) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Sends a frame with its header from the fake tap towards the device.
    fn peer_send(&self, frame: &[u8]) {
        let mut bytes = vec![0xee; VNET_HDR_LEN];
        bytes.extend_from_slice(frame);
        // SAFETY: `bytes` is valid for reads of its length for the call.
        let n = unsafe {
            libc::send(
                self.peer.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT,
            )
        };
        assert_eq!(n, bytes.len() as isize, "{}", io::Error::last_os_error());
    }

    /// Length of the frame waiting for the device in the fake tap, if any.
    fn waiting_in_tap(&self) -> Option<usize> {
        let mut byte = [0u8; 1];
        match recv(self.t.device().as_raw_fd(), &mut byte, libc::MSG_PEEK) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("recv: {e}"),
        }
    }

    fn counters(&self) -> NetCounters {
        self.t.device().counters()
    }
}

#[test]
fn offers_mac_status_and_ring_features_and_nothing_else() {
    let (net, _peer) = net_with_peer();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    assert_eq!(
        net.features(),
        FEATURE_VERSION_1
            | FEATURE_MAC
            | FEATURE_STATUS
            | FEATURE_RING_EVENT_IDX
            | FEATURE_RING_INDIRECT_DESC
    );
    assert_eq!(net.name(), "virtio-net wbtest0");
}

#[test]
fn config_space_holds_the_mac_and_link_up_and_ignores_writes() {
    let mut r = rig();
    let mut bytes = [0xffu8; 12];
    r.t.read(reg::CONFIG, &mut bytes[..8]);
    assert_eq!(bytes[..8], [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0]);
    r.t.write(reg::CONFIG, &[0xaa; 6]);
    let mut part = [0xffu8; 4];
    r.t.device().read_config(4, &mut part);
    assert_eq!(part, [0x34, 0x56, 1, 0]);
    let mut beyond = [0xffu8; 4];
    r.t.device().read_config(8, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    r.t.device().read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn state_round_trips_through_json_and_bincode() {
    let mut r = rig();
    r.post_rx(1, RX_BUF_LEN);
    r.peer_send(&frame(60, 18));
    r.t.notify_queue(0);
    let state = r.t.device().state();
    assert_eq!(state.counters.rx_frames, 1);
    assert_eq!((state.tap.as_str(), state.mac), ("wbtest0", config().mac));

    let json = serde_json::to_string(&state).unwrap();
    assert!(json.contains("\"52:54:00:12:34:56\""), "{json}");
    assert_eq!(serde_json::from_str::<NetState>(&json).unwrap(), state);
    let config_json = serde_json::to_string(&config()).unwrap();
    assert_eq!(
        serde_json::from_str::<NetConfig>(&config_json).unwrap(),
        config()
    );

    let bc = bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding();
    let bytes = bincode::serde::encode_to_vec(&state, bc).unwrap();
    let (back, _): (NetState, usize) = bincode::serde::decode_from_slice(&bytes, bc).unwrap();
    assert_eq!(back, state);
}

#[test]
fn restore_refuses_another_tap_or_mac_before_opening_anything() {
    let state = NetState {
        tap: "wbtest0".to_string(),
        mac: config().mac,
        counters: NetCounters::default(),
    };
    let mut other_mac = config();
    other_mac.mac = "52:54:00:00:00:01".parse().unwrap();
    let e = Net::restore(&other_mac, &state).err().unwrap();
    assert!(matches!(e, NetError::Mismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("52:54:00:12:34:56") && msg.contains("52:54:00:00:00:01"),
        "{msg}"
    );

    let mut other_tap = config();
    other_tap.tap = "wbtest1".to_string();
    let e = Net::restore(&other_tap, &state).err().unwrap();
    assert!(matches!(e, NetError::Mismatch { .. }), "{e}");
    assert!(e.to_string().contains("wbtest1"), "{e}");
}

#[path = "rx_tests.rs"]
mod rx;
#[path = "tx_tests.rs"]
mod tx;
