//! One virtio-blk request: what the driver asked for, the I/O on the backing file, and the
//! status byte that answers it (virtio 1.x section 5.2.6).
//!
//! The request is read as byte streams, not as a fixed descriptor layout (virtio 1.x lets a
//! driver split or merge buffers freely): the first 16 device-readable bytes are the header,
//! the last device-writable byte is the status, and what lies between is the data. A request
//! that does not make sense is answered with `VIRTIO_BLK_S_IOERR` (or `S_UNSUPP` for an
//! unknown type); only a request without any writable byte gets no status, since there is
//! nowhere to put it.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::PathBuf;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestMemoryError};

use crate::devices::virtio::queue::{split_at, total_len, Buffer, Chain};
use crate::devices::virtio::Memory;

pub const SECTOR_SIZE: u64 = 512;
/// Data segments per request the device advertises in `seg_max`.
pub const SEG_MAX: u32 = 128;
/// `seg_max` data descriptors plus the header and the status.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// `struct virtio_blk_req` up to the data: type, reserved, sector.
const HEADER_LEN: u64 = 16;
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Why a request was answered with an error status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the request has no device-writable byte for its status")]
    NoStatus,
    #[error("the request header is {0} bytes, shorter than 16")]
    ShortHeader(u64),
    #[error("a device-readable buffer follows a device-writable one")]
    Misordered,
    #[error("the request has {count} descriptors, more than {max}")]
    TooManyDescriptors { count: usize, max: usize },
    #[error("a {kind} request carries {len} bytes of data the wrong way")]
    WrongDirection { kind: &'static str, len: u64 },
    #[error("the data length {0} is not a whole number of 512-byte sectors")]
    PartialSector(u64),
    #[error("sectors {sector}..+{sectors} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("a write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("flushing the disk file failed")]
    Flush(#[source] io::Error),
    #[error("positioning in the disk file failed")]
    Seek(#[source] io::Error),
    #[error("moving data between the disk file and guest memory failed")]
    Transfer(#[source] GuestMemoryError),
}

impl RequestError {
    /// The status byte that answers the request.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// A failure of the host's file, as opposed to a request the guest got wrong.
    fn is_host_failure(&self) -> bool {
        matches!(
            self,
            RequestError::Flush(_) | RequestError::Seek(_) | RequestError::Transfer(_)
        )
    }
}

/// The backing file and what the requests need to know about it.
pub(super) struct Disk {
    pub file: File,
    pub path: PathBuf,
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// The ID string, NUL-padded.
    pub id: [u8; ID_BYTES],
    /// Host I/O failures so far, to keep the log from flooding.
    pub host_failures: u64,
}

impl Disk {
    /// Carries out the request in `chain` and writes its status byte. Returns the number of
    /// bytes written into the chain (data and status), the used length the driver sees.
    /// `write_back`: the driver negotiated FLUSH, so writes need not reach the disk before
    /// they complete.
    pub fn handle(&mut self, chain: &Chain, mem: &Memory, write_back: bool) -> u32 {
        let writable_len = total_len(&chain.writable);
        // The last writable byte is the status; zero-length buffers never hold it.
        let (data_out, status_buf) = split_at(&chain.writable, writable_len.saturating_sub(1));
        let Some(status_addr) = status_buf.first().map(|b| b.addr) else {
            log::debug!("{}: {}", self.path.display(), RequestError::NoStatus);
            return 0;
        };
        let (status, written) = match self.execute(chain, &data_out, mem, write_back) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                self.log_failure(&e);
                (e.status(), 0)
            }
        };
        // The status byte was checked to be in guest RAM with the rest of the chain.
        if let Err(e) = mem.write_obj(status, status_addr) {
            log::warn!(
                "{}: cannot write a request status: {e}",
                self.path.display()
            );
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    fn execute(
        &mut self,
        chain: &Chain,
        data_out: &[Buffer],
        mem: &Memory,
        write_back: bool,
    ) -> Result<u64, RequestError> {
        let readable_len = total_len(&chain.readable);
        if readable_len < HEADER_LEN {
            return Err(RequestError::ShortHeader(readable_len));
        }
        if chain.misordered {
            return Err(RequestError::Misordered);
        }
        if chain.descriptors() > MAX_DESCRIPTORS {
            return Err(RequestError::TooManyDescriptors {
                count: chain.descriptors(),
                max: MAX_DESCRIPTORS,
            });
        }
        let (header, data_in) = split_at(&chain.readable, HEADER_LEN);
        let (kind, sector) = read_header(mem, &header)?;
        let in_len = total_len(&data_in);
        let out_len = total_len(data_out);

        match kind {
            VIRTIO_BLK_T_IN => {
                no_data("read", in_len)?;
                let offset = self.byte_offset(sector, out_len)?;
                self.read(mem, data_out, offset)?;
                Ok(out_len)
            }
            VIRTIO_BLK_T_OUT => {
                no_data("write", out_len)?;
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let offset = self.byte_offset(sector, in_len)?;
                self.write(mem, &data_in, offset)?;
                if !write_back {
                    self.flush()?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.flush()?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                no_data("get-id", in_len)?;
                let n = write_bytes(mem, data_out, &self.id)?;
                Ok(n)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// The byte offset of `len` bytes at `sector`, refused unless they lie inside the disk.
    fn byte_offset(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::PartialSector(len));
        }
        let sectors = len / SECTOR_SIZE;
        match sector.checked_add(sectors) {
            // `sector` <= capacity, which came from a file size in bytes / 512: no overflow.
            Some(end) if end <= self.capacity_sectors => Ok(sector * SECTOR_SIZE),
            _ => Err(RequestError::OutOfRange {
                sector,
                sectors,
                capacity: self.capacity_sectors,
            }),
        }
    }

    fn read(&self, mem: &Memory, bufs: &[Buffer], offset: u64) -> Result<(), RequestError> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))
            .map_err(RequestError::Seek)?;
        for b in bufs {
            mem.read_exact_volatile_from(b.addr, &mut file, b.len as usize)
                .map_err(RequestError::Transfer)?;
        }
        Ok(())
    }

    fn write(&self, mem: &Memory, bufs: &[Buffer], offset: u64) -> Result<(), RequestError> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))
            .map_err(RequestError::Seek)?;
        for b in bufs {
            mem.write_all_volatile_to(b.addr, &mut file, b.len as usize)
                .map_err(RequestError::Transfer)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), RequestError> {
        self.sync().map_err(RequestError::Flush)
    }

    /// Makes every completed write durable (fdatasync). A read-only disk has none.
    pub fn sync(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn log_failure(&mut self, e: &RequestError) {
        let path = self.path.display();
        if !e.is_host_failure() {
            log::debug!("{path}: refused a request: {e}");
            return;
        }
        // Logged at the 1st, 2nd, 4th, 8th... failure: a failing disk stays visible in the
        // log without one line per request.
        self.host_failures += 1;
        if self.host_failures.is_power_of_two() {
            log::warn!(
                "{path}: request failed ({} host I/O failures so far): {}",
                self.host_failures,
                error_chain(e)
            );
        }
    }
}

/// The request type and sector from the 16 header bytes in `bufs`.
fn read_header(mem: &Memory, bufs: &[Buffer]) -> Result<(u32, u64), RequestError> {
    let mut header = [0u8; HEADER_LEN as usize];
    let mut at = 0;
    for b in bufs {
        let end = at + b.len as usize;
        mem.read_slice(&mut header[at..end], b.addr)
            .map_err(RequestError::Transfer)?;
        at = end;
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    Ok((kind, u64::from_le_bytes(sector)))
}

/// Copies as much of `bytes` as fits into `bufs`; returns how much that was.
fn write_bytes(mem: &Memory, bufs: &[Buffer], bytes: &[u8]) -> Result<u64, RequestError> {
    let mut at = 0;
    for b in bufs {
        let n = (b.len as usize).min(bytes.len() - at);
        mem.write_slice(&bytes[at..at + n], b.addr)
            .map_err(RequestError::Transfer)?;
        at += n;
    }
    Ok(at as u64)
}

fn no_data(kind: &'static str, len: u64) -> Result<(), RequestError> {
    match len {
        0 => Ok(()),
        len => Err(RequestError::WrongDirection { kind, len }),
    }
}

/// `e` and its sources, for a one-line log message.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
