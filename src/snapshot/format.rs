//! Header layout, checksums and atomic file writing for snapshot files.
//!
//! Layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `WBSNAPv1` |
//! | 8 | 4 | format version |
//! | 12 | 4 | flags (zero) |
//! | 16 | 8 | payload length in bytes |
//! | 24 | 4 | CRC-32 of the payload |
//! | 28 | 4 | CRC-32 of bytes 0..28 (so a corrupted length is caught before use) |
//! | 32 | n | payload |

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

pub const MAGIC: [u8; 8] = *b"WBSNAPv1";
/// Bumped whenever the payload's encoding or meaning changes incompatibly.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this waterbear still reads (and writes back for a fallback): 1,
/// before the virtio devices (see `vmm::compat`).
pub const OLDEST_READABLE_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
/// No VM state comes close; anything larger is corrupt or not ours.
pub const MAX_PAYLOAD_LEN: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read snapshot {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write snapshot {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path} is {size} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort { path: PathBuf, size: u64 },
    #[error("{path} is not a waterbear snapshot (wrong magic)")]
    BadMagic { path: PathBuf },
    #[error("snapshot {path} has a corrupt header (header checksum mismatch)")]
    BadHeaderChecksum { path: PathBuf },
    #[error(
        "snapshot {path} has format version {found}; this waterbear reads versions \
         {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "snapshot {path} declares a {len}-byte payload, over the {MAX_PAYLOAD_LEN}-byte limit"
    )]
    PayloadTooLarge { path: PathBuf, len: u64 },
    #[error("snapshot {path} is {size} bytes but its header declares {expected}; the file is truncated or has trailing data")]
    Length {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    #[error("snapshot {path} is corrupt (payload checksum mismatch)")]
    BadChecksum { path: PathBuf },
    #[error("snapshot {path} has a payload that does not decode: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("cannot encode the snapshot payload: {0}")]
    Encode(String),
}

/// The decoded header of a snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    pub payload_len: u64,
    pub payload_crc32: u32,
}

impl Header {
    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_crc32.to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn parse(path: &Path, b: &[u8; HEADER_LEN]) -> Result<Self, SnapshotError> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        if b[0..8] != MAGIC {
            return Err(SnapshotError::BadMagic { path: path.into() });
        }
        if crc32fast::hash(&b[0..28]) != u32_at(28) {
            return Err(SnapshotError::BadHeaderChecksum { path: path.into() });
        }
        let version = u32_at(8);
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(SnapshotError::Version {
                path: path.into(),
                found: version,
            });
        }
        Ok(Header {
            version,
            flags: u32_at(12),
            payload_len: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            payload_crc32: u32_at(24),
        })
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ MAX_PAYLOAD_LEN as usize }>()
}

/// Frames `payload` as snapshot bytes: header then encoded payload.
pub fn encode_frame<T: Serialize>(payload: &T) -> Result<(Header, Vec<u8>), SnapshotError> {
    encode_frame_as(payload, FORMAT_VERSION)
}

/// [`encode_frame`] with an older format version in the header, for a payload of that
/// version's layout (a live update's fallback to a binary that reads only it).
pub fn encode_frame_as<T: Serialize>(
    payload: &T,
    version: u32,
) -> Result<(Header, Vec<u8>), SnapshotError> {
    let body = bincode::serde::encode_to_vec(payload, bincode_config())
        .map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let header = Header {
        version,
        flags: 0,
        payload_len: body.len() as u64,
        payload_crc32: crc32fast::hash(&body),
    };
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(&header.to_bytes());
    bytes.extend_from_slice(&body);
    Ok((header, bytes))
}

/// Frames `payload` as a snapshot and writes it to `path` atomically: a temporary file
/// in the same directory, fsync, rename over `path`, fsync of the directory.
pub fn write_file<T: Serialize>(path: &Path, payload: &T) -> Result<Header, SnapshotError> {
    let (header, bytes) = encode_frame(payload)?;
    write_atomic(path, &bytes).map_err(|source| SnapshotError::Write {
        path: path.into(),
        source,
    })?;
    Ok(header)
}

/// Writes `bytes` to `path` so that a reader sees either the old file or the whole new
/// one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads and checks a snapshot file; returns its header and the raw payload bytes.
pub fn read_file(path: &Path) -> Result<(Header, Vec<u8>), SnapshotError> {
    let read_err = |source| SnapshotError::Read {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size < HEADER_LEN as u64 {
        return Err(SnapshotError::TooShort {
            path: path.into(),
            size,
        });
    }
    let mut hb = [0u8; HEADER_LEN];
    file.read_exact(&mut hb).map_err(read_err)?;
    let header = Header::parse(path, &hb)?;
    if header.payload_len > MAX_PAYLOAD_LEN {
        return Err(SnapshotError::PayloadTooLarge {
            path: path.into(),
            len: header.payload_len,
        });
    }
    let expected = HEADER_LEN as u64 + header.payload_len;
    if size != expected {
        return Err(SnapshotError::Length {
            path: path.into(),
            size,
            expected,
        });
    }
    let mut payload = vec![0u8; header.payload_len as usize];
    file.read_exact(&mut payload).map_err(read_err)?;
    if crc32fast::hash(&payload) != header.payload_crc32 {
        return Err(SnapshotError::BadChecksum { path: path.into() });
    }
    Ok((header, payload))
}

/// Decodes a checked payload; every byte must be used.
pub fn decode_payload<T: DeserializeOwned>(
    path: &Path,
    payload: &[u8],
) -> Result<T, SnapshotError> {
    let decode_err = |reason: String| SnapshotError::Decode {
        path: path.into(),
        reason,
    };
    let (value, used) = bincode::serde::decode_from_slice(payload, bincode_config())
        .map_err(|e| decode_err(e.to_string()))?;
    if used != payload.len() {
        return Err(decode_err(format!(
            "{} trailing bytes",
            payload.len() - used
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm".into(),
            values: (0..100).collect(),
        }
    }

    fn written() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        write_file(&path, &sample()).unwrap();
        (dir, path)
    }

    fn read(path: &Path) -> Result<Sample, SnapshotError> {
        let (_, payload) = read_file(path)?;
        decode_payload(path, &payload)
    }

    #[test]
    fn payload_round_trips() {
        let (_d, path) = written();
        assert_eq!(read(&path).unwrap(), sample());
    }

    #[test]
    fn truncated_snapshot_is_refused() {
        let (_d, path) = written();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(read(&path), Err(SnapshotError::Length { .. })));
        std::fs::write(&path, &bytes[..10]).unwrap();
        assert!(matches!(read(&path), Err(SnapshotError::TooShort { .. })));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let (_d, path) = written();
        let bytes = std::fs::read(&path).unwrap();
        for bit in (0..bytes.len() * 8).step_by(7) {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&path, &b).unwrap();
            assert!(read(&path).is_err(), "bit {bit} flipped went unnoticed");
        }
    }

    #[test]
    fn wrong_magic_and_version_are_named() {
        let (_d, path) = written();
        let mut b = std::fs::read(&path).unwrap();
        b[0] = b'X';
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(read(&path), Err(SnapshotError::BadMagic { .. })));

        let mut b = std::fs::read(&path).unwrap();
        b[0] = MAGIC[0];
        let other = FORMAT_VERSION + 1;
        b[8..12].copy_from_slice(&other.to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(
            read(&path),
            Err(SnapshotError::Version { found, .. }) if found == other
        ));
    }

    #[test]
    fn huge_declared_length_is_refused_before_allocating() {
        let (_d, path) = written();
        let mut b = std::fs::read(&path).unwrap();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(
            read(&path),
            Err(SnapshotError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn failed_write_leaves_the_old_file() {
        let (dir, path) = written();
        let before = std::fs::read(&path).unwrap();
        let bad = dir.path().join("missing-dir").join("vm.state");
        assert!(write_file(&bad, &sample()).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }
}
