//! The built-in test guest, compiled from `resources/testguest` by build.rs and booted
//! when `waterbear run` gets no `--kernel`. It is an ordinary x86_64 ELF entered like a
//! vmlinux, so it exercises the same boot path as Linux.

use std::fs::File;
use std::io::Write;

/// The guest ELF image.
pub const TEST_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// The name errors use for the built-in guest.
pub const TEST_GUEST_NAME: &str = "<built-in test guest>";

/// The guest image as an (anonymous, in-memory) file, so it loads like any kernel.
pub fn test_guest_file() -> std::io::Result<File> {
    let name = c"waterbear-test-guest";
    // SAFETY: `name` is NUL-terminated and the flags are valid; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(TEST_GUEST_ELF)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_guest_is_a_small_x86_64_elf_entered_at_one_mib() {
        assert!(TEST_GUEST_ELF.starts_with(b"\x7fELF"));
        assert_eq!(TEST_GUEST_ELF[4], 2, "64-bit");
        assert_eq!(
            u16::from_le_bytes([TEST_GUEST_ELF[18], TEST_GUEST_ELF[19]]),
            62
        );
        let entry = u64::from_le_bytes(TEST_GUEST_ELF[24..32].try_into().unwrap());
        assert_eq!(entry, 0x10_0000);
        assert!(
            TEST_GUEST_ELF.len() < 16 * 1024,
            "the test guest must stay tiny"
        );
    }
}
