//! virtio-net on a tap interface (virtio 1.x section 5.1).
//!
//! [`Net`] has one receive queue (0) and one transmit queue (1) and offers only what it
//! carries out itself: `VIRTIO_NET_F_MAC` (the address from [`NetConfig`]),
//! `VIRTIO_NET_F_STATUS` (the link is always up) and the ring features. No checksum or
//! segmentation offloads, no mergeable receive buffers, no control queue, no multiqueue:
//! every frame travels whole, checksummed, with a 12-byte `virtio_net_hdr_v1` in front
//! whose only non-zero field is `num_buffers` = 1 on receive. Frames move synchronously on
//! the thread that processes the queue. The host side is a [`Backend`]: a [`Tap`] in the
//! VMM, a socket pair in tests.
//!
//! # Contract with the event loop
//!
//! The VMM registers the tap's descriptor ([`AsRawFd`] on [`Net`]) with its epoll for
//! input, edge-triggered, and calls `notify_queue(0)` on the transport both when the tap
//! becomes readable and when the driver notifies the receive queue; it calls
//! `notify_queue(1)` when the driver notifies the transmit queue.
//!
//! - Receive moves frames tap to guest until the tap has none left (`EAGAIN`) or the
//!   driver has no receive buffer left. A frame is read only once a buffer is known to be
//!   available, so a frame is never lost for want of a buffer: it stays queued in the tap.
//!   An edge-triggered epoll does not fire again for frames already queued, so when the
//!   buffers run out the device asks the driver for a notification on the next buffer it
//!   posts (the available-event index with `RING_EVENT_IDX`; notifications are never
//!   suppressed otherwise), and that notification resumes reading the tap. After a restore
//!   or a resume, `process_after_resume` on the transport reads whatever queued up.
//! - Transmit writes each frame to the tap with one `writev`. A frame the tap refuses is
//!   dropped and counted; the driver gets its buffer back either way. The tap is
//!   non-blocking and a frame it cannot take at once is dropped, so transmit never waits
//!   for the tap to become writable.
//!
//! # What the device drops rather than fails
//!
//! The specification does not make these driver errors, so the device drops the frame,
//! counts it in [`NetCounters`] and returns the buffer: on transmit, a chain with
//! device-writable buffers, one too short for the header and an Ethernet header, or longer
//! than [`MAX_FRAME_LEN`]; on receive, a frame longer than the buffer it would go into
//! (the buffer returns empty) or than [`MAX_FRAME_LEN`] (the buffer waits for the next
//! frame). The header of a transmitted frame is replaced with zeros before it reaches the tap:
//! with no offload negotiated that is the only header a correct driver sends, and it keeps
//! a misbehaving guest from handing offload requests to the host kernel. A chain that
//! breaks the queue protocol itself marks the device broken ([`super::queue`]).

mod backend;
pub mod mac;
mod rx;
pub mod tap;
mod tx;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};

use super::queue::QueueError;
use super::{
    ActivateError, Memory, Queue, VirtioDevice, FEATURE_RING_EVENT_IDX, FEATURE_RING_INDIRECT_DESC,
    FEATURE_VERSION_1,
};
pub use backend::{Backend, TxFrame};
pub use mac::{MacAddr, MacAddrError};
pub use tap::{Tap, TapError};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`, the header in front of every frame once VERSION_1 is
/// negotiated, with or without mergeable buffers.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame with its header, either way: what a driver that negotiated large
/// receive offloads would post, so nothing a correct driver sends is longer.
pub const MAX_FRAME_LEN: usize = 65562;

const FEATURE_MAC: u64 = 1 << VIRTIO_NET_F_MAC;
const FEATURE_STATUS: u64 = 1 << VIRTIO_NET_F_STATUS;

/// `struct virtio_net_config` up to `status`: mac (6 bytes), status (le16). Later fields
/// read as zero.
const CONFIG_LEN: usize = 8;

/// What the VMM's `--net` option describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// An existing tap interface in the VMM's network namespace.
    pub tap: String,
    pub mac: MacAddr,
}

/// Frames and bytes moved and dropped since the device was created (carried across a
/// restore). Bytes count Ethernet frames without the virtio-net header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames read from the tap that the guest did not get.
    pub rx_dropped: u64,
    /// Reads from the tap that failed (other than "no frame").
    pub rx_errors: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames from the guest that did not reach the tap, including `tx_errors`.
    pub tx_dropped: u64,
    /// Frames the tap refused.
    pub tx_errors: u64,
}

/// The interface as a snapshot records it, to check that a restore gets the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub tap: String,
    pub mac: MacAddr,
    pub counters: NetCounters,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(
        "network interface on tap {tap} does not match the snapshot: {what} was {saved}, is \
         now {actual}; restore with the tap and MAC address the VM was saved with"
    )]
    Mismatch {
        tap: String,
        what: &'static str,
        saved: String,
        actual: String,
    },
}

/// A virtio-net device.
pub struct Net {
    name: String,
    config: NetConfig,
    backend: Box<dyn Backend>,
    acked_features: u64,
    config_space: [u8; CONFIG_LEN],
    /// Where a frame from the backend lands before it goes to the guest.
    rx_buf: Vec<u8>,
    /// The length of a frame in `rx_buf` that was read but not yet delivered: the driver
    /// broke the receive queue right after it was read. Delivered first, or dropped by a
    /// reset.
    rx_pending: Option<usize>,
    counters: NetCounters,
}

impl Net {
    /// Attaches to the tap interface named in `config`.
    pub fn open(config: &NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap)?;
        Ok(Self::with_backend(config, Box::new(tap)))
    }

    /// A device on any backend (the tests use a socket pair); `config.tap` only names it.
    pub fn with_backend(config: &NetConfig, backend: Box<dyn Backend>) -> Self {
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..6].copy_from_slice(&config.mac.bytes());
        config_space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Self {
            name: format!("virtio-net {}", config.tap),
            config: config.clone(),
            backend,
            acked_features: 0,
            config_space,
            rx_buf: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            counters: NetCounters::default(),
        }
    }

    /// Attaches to the tap for a restore, after checking `config` names the tap and MAC
    /// address `state` was saved with; the counters carry on from `state`.
    pub fn restore(config: &NetConfig, state: &NetState) -> Result<Self, NetError> {
        check_matches(config, state)?;
        let mut net = Self::open(config)?;
        net.counters = state.counters;
        Ok(net)
    }

    /// Like [`Net::restore`], on a tap descriptor the previous process handed over.
    pub fn restore_attached(
        config: &NetConfig,
        state: &NetState,
        tap: OwnedFd,
    ) -> Result<Self, NetError> {
        check_matches(config, state)?;
        let tap = Tap::from_attached(&config.tap, tap)?;
        let mut net = Self::with_backend(config, Box::new(tap));
        net.counters = state.counters;
        Ok(net)
    }

    /// Fails when the tap interface this device is attached to was deleted meanwhile.
    pub fn check_attached(&self) -> Result<(), NetError> {
        tap::check_attached(self.backend.as_raw_fd(), &self.config.tap)?;
        Ok(())
    }

    pub fn state(&self) -> NetState {
        NetState {
            tap: self.config.tap.clone(),
            mac: self.config.mac,
            counters: self.counters,
        }
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }
}

/// Refuses a restore onto another tap or with another MAC address: the guest's network
/// stack and whatever is bridged to the tap expect the old ones.
fn check_matches(config: &NetConfig, state: &NetState) -> Result<(), NetError> {
    let mismatch = |what, saved: String, actual: String| NetError::Mismatch {
        tap: config.tap.clone(),
        what,
        saved,
        actual,
    };
    if config.tap != state.tap {
        return Err(mismatch(
            "the tap interface",
            state.tap.clone(),
            config.tap.clone(),
        ));
    }
    if config.mac != state.mac {
        return Err(mismatch(
            "the MAC address",
            state.mac.to_string(),
            config.mac.to_string(),
        ));
    }
    Ok(())
}

impl AsRawFd for Net {
    /// The tap's descriptor: readable means frames for queue 0.
    fn as_raw_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        FEATURE_VERSION_1
            | FEATURE_RING_EVENT_IDX
            | FEATURE_RING_INDIRECT_DESC
            | FEATURE_MAC
            | FEATURE_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config_space, offset, data);
    }

    // write_config: with VERSION_1 the MAC address in the configuration is read-only
    // (5.1.4.2), so the trait's default (ignore) applies.

    fn activate(&mut self, acked_features: u64) -> Result<(), ActivateError> {
        self.acked_features = acked_features;
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError> {
        match index {
            RX_QUEUE => self.process_rx(queue, mem),
            TX_QUEUE => self.process_tx(queue, mem),
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        if self.rx_pending.take().is_some() {
            self.counters.rx_dropped += 1;
        }
    }
}

/// Whether the `count`th event of a kind gets a log line: the 1st, 2nd, 4th, 8th... so a
/// steady stream stays visible without a line per frame.
fn worth_logging(count: u64) -> bool {
    count.is_power_of_two()
}

#[cfg(test)]
mod tests;
