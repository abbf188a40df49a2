//! virtio-blk backed by a file (or a host block device) opened by path.
//!
//! [`Block`] offers one request queue, reads, writes, flushes and the device ID
//! (`VIRTIO_BLK_T_GET_ID`). Requests run synchronously on the thread that delivers the
//! queue notification. With `VIRTIO_BLK_F_FLUSH` negotiated the disk behaves as a write-back
//! cache: a write is durable once a later flush from the guest completes (fdatasync on the
//! file). A driver that does not negotiate FLUSH gets write-through: each write is synced
//! before it completes.
//!
//! A read-only disk offers `VIRTIO_BLK_F_RO` and answers any write with
//! `VIRTIO_BLK_S_IOERR`, writing nothing: virtio 1.x section 5.2.6.2 requires exactly that,
//! and Linux marks such a disk read-only (`set_disk_ro`) so its block layer refuses writes
//! before they reach the device; only a misbehaving driver ever sees the error.
//!
//! The request format and the I/O live in [`request`].

pub mod request;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::queue::{drain, QueueError};
use super::{
    ActivateError, Memory, Queue, VirtioDevice, FEATURE_RING_EVENT_IDX, FEATURE_RING_INDIRECT_DESC,
    FEATURE_VERSION_1,
};
use request::{Disk, ID_BYTES, SECTOR_SIZE, SEG_MAX};

/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;

const FEATURE_FLUSH: u64 = 1 << VIRTIO_BLK_F_FLUSH;
const FEATURE_RO: u64 = 1 << VIRTIO_BLK_F_RO;
const FEATURE_SEG_MAX: u64 = 1 << VIRTIO_BLK_F_SEG_MAX;

/// `struct virtio_blk_config` up to `seg_max`: capacity (le64), size_max (le32, unused:
/// `VIRTIO_BLK_F_SIZE_MAX` is not offered), seg_max (le32). Later fields read as zero.
const CONFIG_LEN: usize = 16;

/// What the VMM's `--disk` option describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// The device ID string the guest reads with GET_ID (and Linux shows as the disk's
    /// serial): ASCII, at most 20 bytes.
    pub id: String,
}

/// The disk as a snapshot records it, to check that a restore finds the same disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub id: String,
    pub read_only: bool,
    pub capacity_sectors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk id {id:?} must be ASCII and at most 20 bytes long")]
    Id { id: String },
    #[error("cannot open disk file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "disk file {path} is in use by another VMM (it holds the file's lock); a disk may be \
         shared only read-only (readonly=on everywhere)"
    )]
    InUse { path: PathBuf },
    #[error("disk {path} is {size} bytes, smaller than one 512-byte sector: the guest would see an empty disk")]
    TooSmall { path: PathBuf, size: u64 },
    #[error("disk {path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
    #[error("cannot find the size of disk file {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "disk {path} does not match the snapshot: {what} was {saved}, is now {actual}; \
         restore with the disk the VM was saved with"
    )]
    Mismatch {
        path: PathBuf,
        what: &'static str,
        saved: String,
        actual: String,
    },
    #[error("cannot flush disk file {path} to stable storage")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn check_id(config: &BlockConfig) -> Result<(), BlockError> {
    if !config.id.is_ascii() || config.id.len() > ID_BYTES {
        return Err(BlockError::Id {
            id: config.id.clone(),
        });
    }
    Ok(())
}

/// A virtio-blk device.
pub struct Block {
    name: String,
    id: String,
    disk: Disk,
    features: u64,
    acked_features: u64,
    config_space: [u8; CONFIG_LEN],
}

impl Block {
    /// Opens the disk file (read-only when the config says so) and sizes the disk from it:
    /// whole 512-byte sectors; a partial last sector is not part of the disk.
    pub fn open(config: &BlockConfig) -> Result<Self, BlockError> {
        check_id(config)?;
        let path = config.path.clone();
        // O_NONBLOCK: opening a FIFO read-only would otherwise wait for a writer; the
        // type check below refuses it. Regular files and block devices ignore the flag
        // for I/O.
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        Self::from_file(config, file)
    }

    /// Takes over the disk's descriptor from the process before a live update: the same
    /// file (even if it was renamed or deleted meanwhile) with its lock still held.
    pub fn from_handed_over(config: &BlockConfig, fd: OwnedFd) -> Result<Self, BlockError> {
        check_id(config)?;
        Self::from_file(config, File::from(fd))
    }

    fn from_file(config: &BlockConfig, mut file: File) -> Result<Self, BlockError> {
        let path = config.path.clone();
        let file_type = file
            .metadata()
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?
            .file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(BlockError::NotADisk { path });
        }
        // Two guests writing one disk corrupt it: a writable disk takes the file's lock
        // exclusively, a read-only one shared. The lock belongs to the open file, so a
        // live update, which hands the descriptor over, keeps it.
        let mode = if config.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own has no memory-safety requirements.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
            return Err(BlockError::InUse { path });
        }
        // Seeking to the end also sizes a host block device, whose metadata length is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        if size < SECTOR_SIZE {
            return Err(BlockError::TooSmall { path, size });
        }
        Ok(Self::with_file(config, file, size / SECTOR_SIZE))
    }

    /// Opens the disk for a restore and checks it is the disk `state` was saved with.
    pub fn restore(config: &BlockConfig, state: &BlockState) -> Result<Self, BlockError> {
        Self::open(config)?.matching(config, state)
    }

    /// [`Block::from_handed_over`] for a live update's restore, with the checks of
    /// [`Block::restore`].
    pub fn restore_handed_over(
        config: &BlockConfig,
        state: &BlockState,
        fd: OwnedFd,
    ) -> Result<Self, BlockError> {
        Self::from_handed_over(config, fd)?.matching(config, state)
    }

    fn matching(self, config: &BlockConfig, state: &BlockState) -> Result<Self, BlockError> {
        let block = self;
        let now = block.state();
        let mismatch = |what, saved: &dyn ToString, actual: &dyn ToString| BlockError::Mismatch {
            path: config.path.clone(),
            what,
            saved: saved.to_string(),
            actual: actual.to_string(),
        };
        if now.capacity_sectors != state.capacity_sectors {
            return Err(mismatch(
                "the size in sectors",
                &state.capacity_sectors,
                &now.capacity_sectors,
            ));
        }
        if now.read_only != state.read_only {
            return Err(mismatch("read-only", &state.read_only, &now.read_only));
        }
        if now.id != state.id {
            return Err(mismatch("the id", &state.id, &now.id));
        }
        Ok(block)
    }

    /// The open disk file, for a live update to hand over.
    pub fn file_fd(&self) -> std::os::fd::RawFd {
        self.disk.file.as_raw_fd()
    }

    fn with_file(config: &BlockConfig, file: File, capacity_sectors: u64) -> Self {
        let mut id = [0u8; ID_BYTES];
        id[..config.id.len()].copy_from_slice(config.id.as_bytes());
        let mut features = FEATURE_VERSION_1
            | FEATURE_RING_EVENT_IDX
            | FEATURE_RING_INDIRECT_DESC
            | FEATURE_FLUSH
            | FEATURE_SEG_MAX;
        if config.read_only {
            features |= FEATURE_RO;
        }
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        config_space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Self {
            name: match config.id.as_str() {
                "" => format!("virtio-blk {}", config.path.display()),
                id => format!("virtio-blk {id}"),
            },
            id: config.id.clone(),
            disk: Disk {
                file,
                path: config.path.clone(),
                capacity_sectors,
                read_only: config.read_only,
                id,
                host_failures: 0,
            },
            features,
            acked_features: 0,
            config_space,
        }
    }

    pub fn state(&self) -> BlockState {
        BlockState {
            id: self.id.clone(),
            read_only: self.disk.read_only,
            capacity_sectors: self.disk.capacity_sectors,
        }
    }

    /// Makes every write the guest has seen complete durable, flushed or not. The VMM calls
    /// this before a snapshot or a host reset, so a write acknowledged before the pause
    /// survives even if the guest never flushed it.
    pub fn sync(&self) -> Result<(), BlockError> {
        self.disk.sync().map_err(|source| BlockError::Sync {
            path: self.disk.path.clone(),
            source,
        })
    }

    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config_space, offset, data);
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), ActivateError> {
        self.acked_features = acked_features;
        Ok(())
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError> {
        let write_back = self.acked_features & FEATURE_FLUSH != 0;
        let disk = &mut self.disk;
        drain(queue, mem, |chain| disk.handle(chain, mem, write_back))
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}

#[cfg(test)]
mod tests;
