//! Reading and checking the kernel and initrd, and loading them into guest memory.
//!
//! Everything that can be checked from the files alone (format, command line length,
//! whether kernel and initrd fit the RAM) is checked by `KernelImage::open` and
//! `check_fit` before any guest memory or KVM object exists.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vmm::layout::{CMDLINE_MAX_SIZE, HIMEM_START, MMIO_GAP_START};

/// x86's COMMAND_LINE_SIZE, the limit for kernels whose header does not say otherwise.
const DEFAULT_CMDLINE_LIMIT: usize = 2048;
/// Boot protocol: `HdrS` at 0x202 marks a bzImage setup header.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Highest initrd end address for kernels that do not state one (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {path}")]
    KernelRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat { path: PathBuf },
    #[error("kernel {path} is a 32-bit or non-x86_64 ELF; waterbear boots x86_64 kernels")]
    KernelArch { path: PathBuf },
    #[error("kernel {path} cannot be loaded ({reason}); is it a complete, uncompressed vmlinux or a bzImage?")]
    KernelLoad { path: PathBuf, reason: String },
    #[error("kernel {path} ({size} bytes) does not fit in {memory} bytes of guest memory")]
    KernelTooBig {
        path: PathBuf,
        size: u64,
        memory: u64,
    },
    #[error("cannot read initrd {path}")]
    InitrdRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} is empty")]
    InitrdEmpty { path: PathBuf },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}; give the VM more --memory")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("kernel command line is {len} bytes with its terminating NUL, over the kernel's limit of {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write boot data to guest memory at {addr:#x}")]
    GuestWrite {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// How the first vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit entry with paging on and `rsi` pointing at `boot_params`.
    Linux64(u64),
    /// PVH entry in 32-bit protected mode with `ebx` pointing at `hvm_start_info`.
    Pvh(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

/// A kernel file checked for format and limits but not yet loaded.
pub struct KernelImage {
    path: PathBuf,
    file: File,
    format: Format,
    size: u64,
    header: Option<setup_header>,
}

/// What loading placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    pub kernel_end: u64,
    /// The setup header to copy into `boot_params` (bzImage only).
    pub header: Option<setup_header>,
}

impl KernelImage {
    /// Opens and identifies a kernel; reads nothing into guest memory.
    pub fn open(path: &Path) -> Result<Self, BootError> {
        let file = File::open(path).map_err(|source| BootError::KernelRead {
            path: path.into(),
            source,
        })?;
        Self::from_file(path, file)
    }

    /// Identifies a kernel from an open file; `path` names it in errors.
    pub fn from_file(path: &Path, mut file: File) -> Result<Self, BootError> {
        let read_err = |source| BootError::KernelRead {
            path: path.into(),
            source,
        };
        let size = file.metadata().map_err(read_err)?.len();
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
        let mut head = vec![0u8; 0x400];
        let got = read_up_to(&mut file, &mut head).map_err(read_err)?;
        head.truncate(got);

        let (format, header) = if head.starts_with(b"\x7fELF") {
            // EI_CLASS 2 = 64-bit, e_machine 62 = x86_64.
            if head.len() < 20 || head[4] != 2 || u16::from_le_bytes([head[18], head[19]]) != 62 {
                return Err(BootError::KernelArch { path: path.into() });
            }
            (Format::Elf, None)
        } else if head.len() >= 0x206 && le32(&head, 0x202) == HDRS_MAGIC {
            let mut hdr = setup_header::default();
            file.seek(SeekFrom::Start(0x1f1)).map_err(read_err)?;
            // SAFETY: setup_header is plain old data (repr(C, packed), integers only);
            // any byte pattern is a valid value, and the slice covers exactly its size.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    (&mut hdr as *mut setup_header).cast::<u8>(),
                    std::mem::size_of::<setup_header>(),
                )
            };
            file.read_exact(bytes).map_err(read_err)?;
            (Format::BzImage, Some(hdr))
        } else {
            return Err(BootError::KernelFormat { path: path.into() });
        };
        Ok(KernelImage {
            path: path.into(),
            file,
            format,
            size,
            header,
        })
    }

    /// The longest command line the kernel accepts, counting the terminating NUL.
    pub fn cmdline_limit(&self) -> usize {
        let limit = match self.header {
            // cmdline_size exists from boot protocol 2.06 and excludes the NUL.
            Some(h) if { h.version } >= 0x206 => h.cmdline_size as usize + 1,
            Some(_) => 256,
            None => DEFAULT_CMDLINE_LIMIT,
        };
        limit.min(CMDLINE_MAX_SIZE)
    }

    /// The highest address the initrd may end at.
    fn initrd_addr_max(&self) -> u64 {
        match self.header {
            Some(h) if { h.version } >= 0x203 => u64::from(h.initrd_addr_max),
            _ => DEFAULT_INITRD_ADDR_MAX,
        }
    }

    /// Rough check that the file can fit above 1 MiB; the loader checks exactly.
    pub fn check_size(&self, memory: u64) -> Result<(), BootError> {
        if self.size + HIMEM_START > memory.min(MMIO_GAP_START) {
            return Err(BootError::KernelTooBig {
                path: self.path.clone(),
                size: self.size,
                memory,
            });
        }
        Ok(())
    }

    /// Loads the kernel into guest memory.
    pub fn load(&mut self, mem: &GuestMemoryMmap) -> Result<LoadedKernel, BootError> {
        let himem = Some(GuestAddress(HIMEM_START));
        let result = match self.format {
            Format::Elf => Elf::load(mem, None, &mut self.file, himem),
            Format::BzImage => BzImage::load(mem, None, &mut self.file, himem),
        };
        let path = self.path.clone();
        let loaded = result.map_err(|e| match e {
            linux_loader::loader::Error::MemoryOverflow => BootError::KernelTooBig {
                path,
                size: self.size,
                memory: mem_size(mem),
            },
            other => BootError::KernelLoad {
                path,
                reason: loader_reason(&other),
            },
        })?;
        let entry = match (self.format, loaded.pvh_boot_cap) {
            (Format::Elf, PvhBootCapability::PvhEntryPresent(addr)) => EntryPoint::Pvh(addr.0),
            // For an ELF the loader reports the entry address as `kernel_load`.
            (Format::Elf, _) => EntryPoint::Linux64(loaded.kernel_load.0),
            // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
            (Format::BzImage, _) => EntryPoint::Linux64(loaded.kernel_load.0 + 0x200),
        };
        if loaded.kernel_end > mem_size(mem).min(MMIO_GAP_START) {
            return Err(BootError::KernelTooBig {
                path: self.path.clone(),
                size: self.size,
                memory: mem_size(mem),
            });
        }
        Ok(LoadedKernel {
            entry,
            kernel_end: loaded.kernel_end,
            header: loaded.setup_header,
        })
    }

    /// Where an initrd of `size` bytes goes: the highest page-aligned address below both
    /// the kernel's limit and the end of low RAM, above the kernel.
    pub fn initrd_placement(
        &self,
        path: &Path,
        size: u64,
        kernel_end: u64,
        memory: u64,
    ) -> Result<u64, BootError> {
        let limit = (self.initrd_addr_max() + 1).min(memory.min(MMIO_GAP_START));
        let too_big = || BootError::InitrdTooBig {
            path: path.into(),
            size,
            kernel_end,
            limit,
        };
        let start = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
        if start < kernel_end {
            return Err(too_big());
        }
        Ok(start)
    }
}

/// An initrd read whole into memory.
pub struct Initrd {
    pub path: PathBuf,
    pub data: Vec<u8>,
}

impl Initrd {
    pub fn read(path: &Path) -> Result<Self, BootError> {
        let read_err = |source| BootError::InitrdRead {
            path: path.into(),
            source,
        };
        // Only a regular file has a size to check before reading: /dev/zero or a pipe
        // would be read without end.
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if !meta.is_file() {
            return Err(read_err(std::io::Error::other("not a regular file")));
        }
        let data = std::fs::read(path).map_err(read_err)?;
        if data.is_empty() {
            return Err(BootError::InitrdEmpty { path: path.into() });
        }
        Ok(Initrd {
            path: path.into(),
            data,
        })
    }

    pub fn load(&self, mem: &GuestMemoryMmap, addr: u64) -> Result<(), BootError> {
        mem.write_slice(&self.data, GuestAddress(addr))
            .map_err(|source| BootError::GuestWrite { addr, source })
    }
}

/// Checks a command line against a limit that counts its terminating NUL.
pub fn check_cmdline(cmdline: &str, limit: usize) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let len = cmdline.len() + 1;
    if len > limit {
        return Err(BootError::CmdlineTooLong { len, max: limit });
    }
    Ok(())
}

/// Writes the NUL-terminated command line into guest memory.
pub fn write_cmdline(mem: &GuestMemoryMmap, addr: u64, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { addr, source })
}

fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::GuestMemoryBackend;
    mem.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn loader_reason(e: &linux_loader::loader::Error) -> String {
    match e {
        linux_loader::loader::Error::Elf(inner) => inner.to_string(),
        linux_loader::loader::Error::Bzimage(inner) => inner.to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_tmp(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        (dir, path)
    }

    #[test]
    fn missing_kernel_is_named_in_the_error() {
        let err = KernelImage::open(Path::new("/nonexistent/vmlinux"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn text_file_is_neither_elf_nor_bzimage() {
        let (_d, path) = write_tmp(b"just some text\n");
        let err = KernelImage::open(&path).err().unwrap();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
    }

    #[test]
    fn thirty_two_bit_elf_is_refused() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 1; // ELFCLASS32
        elf[18] = 3; // EM_386
        let (_d, path) = write_tmp(&elf);
        assert!(matches!(
            KernelImage::open(&path).err().unwrap(),
            BootError::KernelArch { .. }
        ));
    }

    #[test]
    fn bzimage_header_gives_the_cmdline_limit() {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        let (_d, path) = write_tmp(&img);
        let k = KernelImage::open(&path).unwrap();
        assert_eq!(k.cmdline_limit(), 2048);
    }

    #[test]
    fn cmdline_limit_counts_the_nul() {
        check_cmdline(&"a".repeat(2047), 2048).unwrap();
        let err = check_cmdline(&"a".repeat(2048), 2048).err().unwrap();
        assert!(matches!(
            err,
            BootError::CmdlineTooLong {
                len: 2049,
                max: 2048
            }
        ));
        assert!(matches!(
            check_cmdline("a\0b", 2048),
            Err(BootError::CmdlineNul)
        ));
    }

    #[test]
    fn initrd_goes_high_and_must_clear_the_kernel() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[18] = 62;
        let (_d, path) = write_tmp(&elf);
        let k = KernelImage::open(&path).unwrap();
        let p = Path::new("initrd");
        let start = k
            .initrd_placement(p, 0x10_0000, 0x200_0000, 64 << 20)
            .unwrap();
        assert_eq!(start, (64 << 20) - 0x10_0000);
        let err = k
            .initrd_placement(p, 63 << 20, 0x200_0000, 64 << 20)
            .err()
            .unwrap();
        assert!(matches!(err, BootError::InitrdTooBig { .. }), "{err}");
    }
}
