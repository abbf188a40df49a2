//! The snapshot file format: a fixed header (magic, format version, payload length,
//! checksums) followed by a bincode-encoded payload.
//!
//! This module knows nothing about what a VM's state contains; it frames, checks and
//! atomically writes any serde payload. Readers check the header, the version, the
//! lengths against the file size and the checksums before allocating for or decoding
//! the payload, so a truncated, corrupted or foreign file is refused with a clear error.

mod format;
pub mod inspect;

pub use format::{
    decode_payload, encode_frame, encode_frame_as, read_file, write_atomic, write_file, Header,
    SnapshotError, FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_PAYLOAD_LEN,
};
