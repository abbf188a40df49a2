//! What a virtio-net device needs from the host side of the link, and the gather list an
//! outgoing frame is handed over in.
//!
//! [`Backend`] is deliberately small (read one frame, write one frame, a file descriptor
//! to wait on) so that the device can run against a tap ([`super::tap::Tap`]) or, in
//! tests, against one end of a socket pair. Both directions carry the 12-byte
//! `virtio_net_hdr_v1` in front of the Ethernet frame, as a tap opened with
//! `IFF_VNET_HDR` and `TUNSETVNETHDRSZ` 12 does.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};

use vm_memory::volatile_memory::PtrGuard;
use vm_memory::GuestMemoryBackend;

use crate::devices::virtio::queue::Buffer;
use crate::devices::virtio::Memory;

/// The host side of a virtio-net link.
pub trait Backend: AsRawFd + Send {
    /// Reads one frame, header first, into `buf` without blocking. Returns the frame's
    /// full length, which is larger than `buf` when the frame did not fit (the bytes past
    /// `buf` are lost). `WouldBlock` means there is no frame.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame, header first, with a single gathering write. Returns the bytes
    /// written.
    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<usize>;
}

/// One outgoing frame as a gather list: a header the device supplies, then the frame
/// bytes straight from guest memory.
///
/// The iovecs stay valid for `'a`, the borrow of guest memory they were built from; the
/// guest may still change the bytes while they are written, which only garbles its own
/// frame.
pub struct TxFrame<'a> {
    iovecs: Vec<libc::iovec>,
    len: usize,
    _guards: Vec<PtrGuard>,
    _mem: PhantomData<&'a Memory>,
}

impl<'a> TxFrame<'a> {
    /// `header` followed by the bytes of `bufs` in guest memory. `None` when a buffer is
    /// not in guest memory after all, or the frame would need more than `max_iovecs`
    /// pieces.
    pub(super) fn gather(
        header: &'static [u8],
        bufs: &[Buffer],
        mem: &'a Memory,
        max_iovecs: usize,
    ) -> Option<Self> {
        let mut frame = Self {
            iovecs: vec![libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            }],
            len: header.len(),
            _guards: Vec::new(),
            _mem: PhantomData,
        };
        for buf in bufs {
            // A guest buffer may span memory regions that are apart in the host.
            for slice in GuestMemoryBackend::get_slices(mem, buf.addr, buf.len as usize) {
                let guard = slice.ok()?.ptr_guard();
                if guard.len() == 0 {
                    continue;
                }
                if frame.iovecs.len() == max_iovecs {
                    return None;
                }
                frame.iovecs.push(libc::iovec {
                    iov_base: guard.as_ptr() as *mut libc::c_void,
                    iov_len: guard.len(),
                });
                frame.len += guard.len();
                frame._guards.push(guard);
            }
        }
        Some(frame)
    }

    /// Every byte of the frame, header included, for `writev`.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Length in bytes, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `writev` of `frame` to `fd`, retried when a signal interrupts it.
pub fn writev_frame(fd: RawFd, frame: &TxFrame<'_>) -> io::Result<usize> {
    let iovecs = frame.iovecs();
    let count = libc::c_int::try_from(iovecs.len()).map_err(|_| invalid_frame())?;
    loop {
        // SAFETY: every iovec points at `iov_len` readable bytes that outlive `frame`: the
        // header is static and the rest is guest memory borrowed for `'a` (TxFrame::gather);
        // writev only reads them.
        let n = unsafe { libc::writev(fd, iovecs.as_ptr(), count) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `read` of one frame from `fd` into `buf`, retried when a signal interrupts it.
pub fn read_frame(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn invalid_frame() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}
