use std::io::Write;
use std::sync::Arc;

use tempfile::NamedTempFile;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::testutil::{
    memory, read_reg, start, DriverQueue, RecordingInterrupt, DATA,
};
use crate::devices::virtio::{FEATURE_VERSION_1, STATUS_DEVICE_NEEDS_RESET};

const HEADER: u64 = 0x4_0000;
const STATUS: u64 = 0x5_0000;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// A disk file of `sectors` sectors where every byte of sector n is n (mod 256), plus
/// `tail` bytes that do not make a whole sector.
fn disk_file(sectors: u64, tail: usize) -> NamedTempFile {
    let mut f = NamedTempFile::new().unwrap();
    for n in 0..sectors {
        f.write_all(&[n as u8; SECTOR_SIZE as usize]).unwrap();
    }
    f.write_all(&vec![0xee; tail]).unwrap();
    f
}

fn config(file: &NamedTempFile, read_only: bool) -> BlockConfig {
    BlockConfig {
        path: file.path().to_path_buf(),
        read_only,
        id: "data-disk".to_string(),
    }
}

struct Rig {
    t: MmioTransport<Block>,
    irq: Arc<RecordingInterrupt>,
    mem: Memory,
    q: DriverQueue,
    file: NamedTempFile,
}

fn rig_with(file: NamedTempFile, read_only: bool, features: Option<u64>) -> Rig {
    let mem = memory();
    let irq = RecordingInterrupt::new();
    let block = Block::open(&config(&file, read_only)).unwrap();
    let features = features.unwrap_or(block.features());
    let mut t = MmioTransport::new(block, mem.clone(), irq.clone());
    let q = DriverQueue::new(QUEUE_SIZE, 0x1_0000);
    start(&mut t, std::slice::from_ref(&q), features);
    assert!(t.is_running());
    Rig {
        t,
        irq,
        mem,
        q,
        file,
    }
}

fn rig(read_only: bool) -> Rig {
    rig_with(disk_file(16, 0), read_only, None)
}

impl Rig {
    /// Writes a request header and queues header, `data` and a status byte, Linux style.
    fn queue(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) {
        self.mem
            .write_obj(kind.to_le(), GuestAddress(HEADER))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(HEADER + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut bufs = vec![(HEADER, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((STATUS, 1, true));
        self.q.add_chain(&self.mem, &bufs);
    }

    /// Queues a request, notifies, and returns (status byte, used length).
    fn submit(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        self.queue(kind, sector, data);
        self.t.notify_queue(0);
        self.completion()
    }

    fn completion(&self) -> (u8, u32) {
        let used = self.q.used_idx(&self.mem);
        assert!(used > 0, "nothing completed");
        let (_, len) = self.q.used_elem(&self.mem, used - 1);
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    fn file_bytes(&self) -> Vec<u8> {
        std::fs::read(self.file.path()).unwrap()
    }

    fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }
}

#[test]
fn config_space_reports_whole_sectors_and_seg_max() {
    let r = rig_with(disk_file(10, 100), false, None);
    let mut cap = [0u8; 8];
    r.t.device().read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 10);
    let mut seg_max = [0u8; 4];
    r.t.device().read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
    let mut beyond = [0xffu8; 4];
    r.t.device().read_config(64, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn read_only_is_offered_only_for_a_read_only_disk() {
    let rw = Block::open(&config(&disk_file(1, 0), false)).unwrap();
    let ro = Block::open(&config(&disk_file(1, 0), true)).unwrap();
    for block in [&rw, &ro] {
        let f = block.features();
        assert_ne!(f & FEATURE_VERSION_1, 0);
        assert_ne!(f & FEATURE_FLUSH, 0);
        assert_ne!(f & FEATURE_SEG_MAX, 0);
    }
    assert_eq!(rw.features() & FEATURE_RO, 0);
    assert_ne!(ro.features() & FEATURE_RO, 0);
}

#[test]
fn read_copies_sectors_from_the_file() {
    let mut r = rig(false);
    let (status, len) = r.submit(VIRTIO_BLK_T_IN, 3, &[(DATA, 1024, true)]);
    assert_eq!((status, len), (OK, 1025));
    let data = r.guest_bytes(DATA, 1024);
    assert!(data[..512].iter().all(|&b| b == 3));
    assert!(data[512..].iter().all(|&b| b == 4));
    assert!(r
        .irq
        .take()
        .contains(&crate::devices::virtio::INTERRUPT_VRING));
}

#[test]
fn write_lands_in_the_file_at_its_sector() {
    let mut r = rig(false);
    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let (status, len) = r.submit(VIRTIO_BLK_T_OUT, 5, &[(DATA, 512, false)]);
    assert_eq!((status, len), (OK, 1));
    let file = r.file_bytes();
    assert!(file[5 * 512..6 * 512].iter().all(|&b| b == 0xab));
    assert!(file[6 * 512..7 * 512].iter().all(|&b| b == 6));
    assert_eq!(r.submit(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
}

#[test]
fn write_without_negotiated_flush_completes() {
    let features = Block::open(&config(&disk_file(1, 0), false))
        .unwrap()
        .features();
    let mut r = rig_with(disk_file(4, 0), false, Some(features & !FEATURE_FLUSH));
    assert_eq!(
        r.submit(VIRTIO_BLK_T_OUT, 1, &[(DATA, 512, false)]),
        (OK, 1)
    );
}

#[test]
fn read_only_disk_answers_a_write_with_ioerr_and_keeps_its_bytes() {
    let mut r = rig(true);
    let before = r.file_bytes();
    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.submit(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]).0,
        IOERR
    );
    assert_eq!(r.file_bytes(), before);
    assert_eq!(r.submit(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0, OK);
    assert_eq!(r.submit(VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
}

#[test]
fn requests_past_the_end_get_ioerr_and_never_grow_the_file() {
    let mut r = rig(false);
    let size = r.file_bytes().len();
    assert_eq!(
        r.submit(VIRTIO_BLK_T_IN, 15, &[(DATA, 1024, true)]).0,
        IOERR
    );
    assert_eq!(
        r.submit(VIRTIO_BLK_T_OUT, 16, &[(DATA, 512, false)]).0,
        IOERR
    );
    assert_eq!(
        r.submit(VIRTIO_BLK_T_OUT, u64::MAX, &[(DATA, 512, false)])
            .0,
        IOERR
    );
    assert_eq!(
        r.submit(VIRTIO_BLK_T_IN, u64::MAX / 512, &[(DATA, 512, true)])
            .0,
        IOERR
    );
    assert_eq!(r.file_bytes().len(), size);
    assert_eq!(r.submit(VIRTIO_BLK_T_IN, 15, &[(DATA, 512, true)]).0, OK);
}

#[test]
fn data_that_is_not_whole_sectors_gets_ioerr() {
    let mut r = rig(false);
    assert_eq!(r.submit(VIRTIO_BLK_T_IN, 0, &[(DATA, 100, true)]).0, IOERR);
}

#[test]
fn get_id_returns_the_id_nul_padded_and_truncates_to_the_buffer() {
    let mut r = rig(false);
    let (status, len) = r.submit(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    assert_eq!((status, len), (OK, 21));
    let mut expected = b"data-disk".to_vec();
    expected.resize(20, 0);
    assert_eq!(r.guest_bytes(DATA, 20), expected);
    assert_eq!(
        r.submit(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 4, true)]),
        (OK, 5)
    );
}

#[test]
fn unknown_request_type_gets_unsupp() {
    let mut r = rig(false);
    assert_eq!(r.submit(99, 0, &[]).0, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn data_in_the_wrong_direction_gets_ioerr() {
    let mut r = rig(false);
    let before = r.file_bytes();
    assert_eq!(r.submit(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]).0, IOERR);
    assert_eq!(r.submit(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, true)]).0, IOERR);
    assert_eq!(
        r.submit(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, false)]).0,
        IOERR
    );
    assert_eq!(r.file_bytes(), before);
}

#[test]
fn short_header_or_misordered_chain_gets_ioerr() {
    let mut r = rig(false);
    r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    r.q.add_chain(&r.mem, &[(HEADER, 8, false), (STATUS, 1, true)]);
    r.t.notify_queue(0);
    assert_eq!(r.completion().0, IOERR);

    r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let chain = [(DATA, 512, true), (HEADER, 16, false), (STATUS, 1, true)];
    r.q.add_chain(&r.mem, &chain);
    r.t.notify_queue(0);
    assert_eq!(r.completion().0, IOERR);
}

#[test]
fn more_descriptors_than_seg_max_allows_gets_ioerr() {
    let mut r = rig(false);
    let data: Vec<_> = (0..=u64::from(SEG_MAX))
        .map(|i| (DATA + 512 * i, 512, true))
        .collect();
    assert_eq!(r.submit(VIRTIO_BLK_T_IN, 0, &data).0, IOERR);
    assert!(!r.t.needs_reset());
    assert_eq!(r.submit(VIRTIO_BLK_T_IN, 0, &data[..8]).0, OK);
}

#[test]
fn any_descriptor_layout_is_accepted() {
    let mut r = rig(false);
    r.mem
        .write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(HEADER))
        .unwrap();
    r.mem
        .write_obj(2u64.to_le(), GuestAddress(HEADER + 8))
        .unwrap();
    // Header split in two; data and status in one writable buffer.
    r.q.add_chain(
        &r.mem,
        &[
            (HEADER, 10, false),
            (HEADER + 10, 6, false),
            (DATA, 513, true),
        ],
    );
    r.t.notify_queue(0);
    let used = r.q.used_elem(&r.mem, 0);
    assert_eq!(used.1, 513);
    let bytes = r.guest_bytes(DATA, 513);
    assert!(bytes[..512].iter().all(|&b| b == 2));
    assert_eq!(bytes[512], OK);
}

#[test]
fn request_without_a_status_byte_is_returned_empty() {
    let mut r = rig(false);
    r.q.add_chain(&r.mem, &[(HEADER, 16, false)]);
    r.t.notify_queue(0);
    assert_eq!(r.q.used_elem(&r.mem, 0).1, 0);
    assert!(r.t.is_running());
}

#[test]
fn out_of_range_index_in_the_request_queue_breaks_the_device() {
    let mut r = rig(false);
    r.q.set_avail_idx(&r.mem, 1000);
    r.t.notify_queue(0);
    assert!(r.t.needs_reset());
    assert_ne!(
        read_reg(&mut r.t, reg::STATUS) & STATUS_DEVICE_NEEDS_RESET,
        0
    );
}

#[test]
fn a_write_in_flight_at_a_snapshot_reaches_the_disk_after_restore() {
    let mut r = rig(false);
    let block_state = r.t.device().state();
    r.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    // Published as the VM paused: saved, but never processed by the old VMM.
    r.queue(VIRTIO_BLK_T_OUT, 7, &[(DATA, 512, false)]);
    let state = r.t.save();
    // The old VMM is gone (and with it the disk's lock) before the new one restores.
    let scratch = Block::open(&config(&disk_file(1, 0), false)).unwrap();
    drop(std::mem::replace(
        &mut r.t,
        MmioTransport::new(scratch, r.mem.clone(), r.irq.clone()),
    ));

    let block = Block::restore(&config(&r.file, false), &block_state).unwrap();
    let mut t = MmioTransport::restore(block, r.mem.clone(), r.irq.clone(), &state).unwrap();
    t.process_after_resume();
    assert_eq!(r.completion(), (OK, 1));
    assert!(r.file_bytes()[7 * 512..8 * 512].iter().all(|&b| b == 0x5a));
    t.device().sync().unwrap();
}

#[test]
fn restore_refuses_a_disk_that_changed() {
    let file = disk_file(8, 0);
    let state = Block::open(&config(&file, false)).unwrap().state();
    file.as_file().set_len(4 * 512).unwrap();
    let e = Block::restore(&config(&file, false), &state).err().unwrap();
    assert!(matches!(e, BlockError::Mismatch { .. }), "{e}");
    let e = Block::restore(&config(&disk_file(8, 0), true), &state)
        .err()
        .unwrap();
    assert!(matches!(e, BlockError::Mismatch { .. }), "{e}");
}

#[test]
fn open_refuses_a_missing_file_a_directory_and_a_long_id() {
    let missing = BlockConfig {
        path: "/nonexistent/waterbear-disk".into(),
        read_only: false,
        id: String::new(),
    };
    assert!(matches!(
        Block::open(&missing),
        Err(BlockError::Open { .. })
    ));
    let dir = BlockConfig {
        path: std::env::temp_dir(),
        read_only: true,
        ..missing
    };
    assert!(matches!(
        Block::open(&dir),
        Err(BlockError::NotADisk { .. })
    ));
    let file = disk_file(1, 0);
    let mut long = config(&file, false);
    long.id = "x".repeat(21);
    assert!(matches!(Block::open(&long), Err(BlockError::Id { .. })));
}

#[test]
fn a_writable_disk_is_locked_against_every_other_user() {
    let file = disk_file(8, 0);
    let first = Block::open(&config(&file, false)).unwrap();
    for read_only in [false, true] {
        let err = Block::open(&config(&file, read_only)).err();
        assert!(
            matches!(err, Some(BlockError::InUse { .. })),
            "second open (read_only {read_only}) gave {err:?}"
        );
    }
    drop(first);
    Block::open(&config(&file, false)).unwrap();
}

#[test]
fn read_only_users_share_a_disk_but_keep_writers_out() {
    let file = disk_file(8, 0);
    let a = Block::open(&config(&file, true)).unwrap();
    let b = Block::open(&config(&file, true)).unwrap();
    assert!(matches!(
        Block::open(&config(&file, false)),
        Err(BlockError::InUse { .. })
    ));
    drop((a, b));
}
