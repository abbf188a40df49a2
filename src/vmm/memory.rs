//! Guest RAM backends: a memfd (optionally of huge pages) or a file, always mapped
//! `MAP_SHARED` so the memory can outlive the mapping process.
//!
//! This module creates and maps the backing; it does not register the mapping with KVM
//! (see `vm.rs`) and does not know what the guest puts in it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use super::config::MemoryBackend;
use super::layout::ram_ranges;

/// Suffix of the marker file that a saved VM leaves beside its memory file. While the
/// marker exists, the memory file holds a saved guest and a fresh boot must not use it.
pub const SAVED_MARKER_SUFFIX: &str = ".waterbear-saved";

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory memfd")]
    Memfd(#[source] std::io::Error),
    #[error("cannot open memory file {path}")]
    OpenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("memory file {path} has {actual} bytes but the VM needs {expected}; use another file or --memory {actual_mib}M")]
    FileSize {
        path: PathBuf,
        actual: u64,
        expected: u64,
        actual_mib: u64,
    },
    #[error("memory file {path} holds a saved VM's memory (marker {marker} exists); restore that VM or remove both files")]
    HoldsSavedVm { path: PathBuf, marker: PathBuf },
    #[error("memory file {path} is in use by another VMM")]
    InUse { path: PathBuf },
    #[error("memory file {path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("cannot size the guest memory to {size} bytes")]
    Resize { size: u64, source: std::io::Error },
    #[error("not enough free huge pages for {size} bytes of guest memory ({free} bytes free in {page}-byte pages); reserve more in /proc/sys/vm/nr_hugepages")]
    HugepagesShort { size: u64, free: u64, page: u64 },
    #[error("cannot map {size} bytes of guest memory at guest address {addr:#x}")]
    Map {
        size: u64,
        addr: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot assemble the guest memory map")]
    Regions(#[source] vm_memory::region::GuestRegionCollectionError),
    #[error("guest memory region at {0:#x} wraps past the end of the address space")]
    RegionOverflow(u64),
}

impl MemoryError {
    fn file_size(path: &Path, actual: u64, expected: u64) -> Self {
        MemoryError::FileSize {
            path: path.into(),
            actual,
            expected,
            actual_mib: actual >> 20,
        }
    }
}

/// Opens a memory file read-write and takes its `flock`; `create` makes a missing one.
fn open_locked(path: &Path, create: bool) -> Result<(File, std::fs::Metadata), MemoryError> {
    let open_err = |source| MemoryError::OpenFile {
        path: path.into(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.file_type().is_file() {
        return Err(MemoryError::NotRegular { path: path.into() });
    }
    if !try_lock_exclusive(&file) {
        return Err(MemoryError::InUse { path: path.into() });
    }
    Ok((file, meta))
}

/// Guest RAM: the backing file and its shared mapping.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    file: Arc<File>,
    size: u64,
    backend: MemoryBackend,
    /// This process created the memory file (so a failed start removes it again).
    created_file: bool,
}

impl GuestRam {
    /// Creates (or, for an existing file of the right size, opens) the backing and maps it.
    pub fn create(backend: &MemoryBackend, size: u64) -> Result<Self, MemoryError> {
        let (file, created_file) = match backend {
            MemoryBackend::Memfd => (create_memfd(size, false)?, false),
            MemoryBackend::Hugepages => {
                check_free_hugepages(size)?;
                (create_memfd(size, true)?, false)
            }
            MemoryBackend::File { path } => {
                let existed = path.exists();
                (open_memory_file(path, size)?, !existed)
            }
        };
        let file = Arc::new(file);
        let mem = match map_shared(&file, size) {
            Ok(mem) => mem,
            Err(e) => {
                if let (true, MemoryBackend::File { path }) = (created_file, backend) {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        };
        Ok(GuestRam {
            mem,
            file,
            size,
            backend: backend.clone(),
            created_file,
        })
    }

    /// Maps an existing memory file of exactly `size` bytes, as a restore does: the file
    /// is never created, resized or truncated, and must not be in use by another VMM.
    pub fn open_existing(backend: &MemoryBackend, size: u64) -> Result<Self, MemoryError> {
        let MemoryBackend::File { path } = backend else {
            return GuestRam::create(backend, size);
        };
        let (file, meta) = open_locked(path, false)?;
        if meta.len() != size {
            return Err(MemoryError::file_size(path, meta.len(), size));
        }
        Self::map_file(file, backend, size)
    }

    /// A new memfd-backed RAM holding a copy of the memory file at `path`, which must
    /// have exactly `size` bytes (a copying restore).
    pub fn copy_of(path: &Path, backend: &MemoryBackend, size: u64) -> Result<Self, MemoryError> {
        let open_err = |source| MemoryError::OpenFile {
            path: path.into(),
            source,
        };
        let mut file = File::open(path).map_err(open_err)?;
        let actual = file.metadata().map_err(open_err)?.len();
        if actual != size {
            return Err(MemoryError::file_size(path, actual, size));
        }
        let ram = GuestRam::create(backend, size)?;
        for (addr, len) in ram.chunks() {
            ram.memory()
                .read_exact_volatile_from(addr, &mut file, len)
                .map_err(|e| open_err(std::io::Error::other(e)))?;
        }
        Ok(ram)
    }

    /// Maps guest RAM from a descriptor handed over by a previous VMM (live update); the
    /// backend records what the descriptor is.
    pub fn from_file(file: File, backend: &MemoryBackend, size: u64) -> Result<Self, MemoryError> {
        let actual = file.metadata().map(|m| m.len()).unwrap_or(0);
        if actual != size {
            return Err(MemoryError::file_size(
                Path::new("<handed-over memory>"),
                actual,
                size,
            ));
        }
        Self::map_file(file, backend, size)
    }

    /// Maps an opened, checked file of `size` bytes that this process did not create.
    fn map_file(file: File, backend: &MemoryBackend, size: u64) -> Result<Self, MemoryError> {
        let file = Arc::new(file);
        let mem = map_shared(&file, size)?;
        Ok(GuestRam {
            mem,
            file,
            size,
            backend: backend.clone(),
            created_file: false,
        })
    }

    /// Removes the memory file if this process created it: used when a start fails, so
    /// that a failed `run` leaves nothing behind.
    pub fn discard_if_created(self) {
        if let (true, MemoryBackend::File { path }) = (self.created_file, &self.backend) {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("cannot remove memory file {}: {e}", path.display());
            }
        }
    }

    /// Guest RAM as consecutive pieces of at most 256 MiB, in file order: one read or
    /// write system call moves at most 2 GiB, so copies go piece by piece.
    pub fn chunks(&self) -> Vec<(GuestAddress, usize)> {
        const CHUNK: u64 = 256 << 20;
        let mut out = Vec::new();
        for region in self.mem.iter() {
            let (start, len) = (region.start_addr().0, region.len());
            let mut off = 0;
            while off < len {
                let n = CHUNK.min(len - off);
                out.push((GuestAddress(start + off), n as usize));
                off += n;
            }
        }
        out
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn backend(&self) -> &MemoryBackend {
        &self.backend
    }
}

/// The page size guest memory must be a multiple of for this backend.
pub fn backend_page_size(backend: &MemoryBackend) -> u64 {
    match backend {
        MemoryBackend::Hugepages => default_hugepage_size().unwrap_or(2 << 20),
        _ => 4096,
    }
}

/// The marker path for a memory file.
pub fn saved_marker(path: &Path) -> PathBuf {
    let mut marker = path.as_os_str().to_owned();
    marker.push(SAVED_MARKER_SUFFIX);
    PathBuf::from(marker)
}

fn create_memfd(size: u64, hugetlb: bool) -> Result<File, MemoryError> {
    let name = CString::new("waterbear-guest-ram").expect("static name has no NUL");
    let mut flags = libc::MFD_CLOEXEC;
    if hugetlb {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid for
    // memfd_create; the returned descriptor is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Resize { size, source })?;
    Ok(file)
}

fn open_memory_file(path: &Path, size: u64) -> Result<File, MemoryError> {
    // Beside the path given and beside the file it resolves to: a symlink must not
    // lead a fresh boot past a saved guest's marker.
    let resolved = path.canonicalize().ok();
    for marker in std::iter::once(saved_marker(path)).chain(resolved.as_deref().map(saved_marker)) {
        if marker.exists() {
            return Err(MemoryError::HoldsSavedVm {
                path: path.into(),
                marker,
            });
        }
    }
    let existed = path.exists();
    let (file, meta) = open_locked(path, true)?;
    if existed && meta.len() != 0 && meta.len() != size {
        return Err(MemoryError::file_size(path, meta.len(), size));
    }
    if meta.len() != size {
        if let Err(source) = file.set_len(size) {
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            return Err(MemoryError::Resize { size, source });
        }
    }
    Ok(file)
}

/// Takes a non-blocking exclusive `flock` that lives as long as the open file.
pub fn try_lock_exclusive(file: &File) -> bool {
    // SAFETY: flock on a valid open descriptor has no memory-safety requirements.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn map_shared(file: &Arc<File>, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size) {
        let region = MmapRegion::<()>::build(
            Some(FileOffset::from_arc(file.clone(), offset)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryError::Map {
            size: len,
            addr: start,
            source,
        })?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or(MemoryError::RegionOverflow(start))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn default_hugepage_size() -> Option<u64> {
    meminfo_kib("Hugepagesize").map(|kib| kib << 10)
}

fn check_free_hugepages(size: u64) -> Result<(), MemoryError> {
    let page = default_hugepage_size().unwrap_or(2 << 20);
    let free = meminfo_kib("HugePages_Free").unwrap_or(0) * page;
    if free < size {
        return Err(MemoryError::HugepagesShort { size, free, page });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn chunks_cover_ram_in_pieces_a_system_call_can_move() {
        let ram = GuestRam::create(&MemoryBackend::Memfd, 4 << 30).unwrap();
        let chunks = ram.chunks();
        assert!(chunks.iter().all(|c| c.1 <= 256 << 20));
        assert_eq!(chunks.iter().map(|c| c.1 as u64).sum::<u64>(), 4 << 30);
        assert_eq!(
            chunks.last().unwrap().0 .0 + (256 << 20),
            5 << 30,
            "RAM above 4 GiB last"
        );
    }

    #[test]
    fn memfd_ram_is_shared_and_sized() {
        let ram = GuestRam::create(&MemoryBackend::Memfd, 32 << 20).unwrap();
        assert_eq!(ram.file().metadata().unwrap().len(), 32 << 20);
        ram.memory()
            .write_obj(0xabcdu32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            ram.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xabcd
        );
        assert_eq!(ram.memory().num_regions(), 1);
    }

    #[test]
    fn file_ram_writes_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let ram = GuestRam::create(&MemoryBackend::File { path: path.clone() }, 16 << 20).unwrap();
        ram.memory()
            .write_slice(b"waterbear", GuestAddress(0x2000))
            .unwrap();
        drop(ram);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[0x2000..0x2009], b"waterbear");
    }

    #[test]
    fn existing_memory_file_of_another_size_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let err = GuestRam::create(&MemoryBackend::File { path: path.clone() }, 16 << 20)
            .err()
            .unwrap();
        assert!(
            matches!(err, MemoryError::FileSize { actual: 4096, .. }),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 4096]);
    }

    #[test]
    fn memory_file_of_a_saved_vm_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        std::fs::write(&path, vec![1u8; 16 << 20]).unwrap();
        std::fs::write(saved_marker(&path), b"{}").unwrap();
        let err = GuestRam::create(&MemoryBackend::File { path }, 16 << 20)
            .err()
            .unwrap();
        assert!(matches!(err, MemoryError::HoldsSavedVm { .. }), "{err}");
    }

    #[test]
    fn memory_file_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let backend = MemoryBackend::File { path };
        let _first = GuestRam::create(&backend, 16 << 20).unwrap();
        let err = GuestRam::create(&backend, 16 << 20).err().unwrap();
        assert!(matches!(err, MemoryError::InUse { .. }), "{err}");
    }
}
