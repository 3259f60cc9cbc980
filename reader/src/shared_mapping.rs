//! [`SharedMapping`]: a file of atomics that every daemon generation of a
//! mount maps (`MAP_SHARED`), so that state outlives a daemon killed with
//! SIGKILL. Used by the counters and by the passthrough open table.
//!
//! The file starts with a 64-byte header: a magic word naming what the
//! file holds and a layout word (its size, or what the user says changes
//! with the layout). A file with another size, magic or layout is zeroed
//! first; zero must be a valid value of whatever the body holds.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{IoContext, StorageError};

/// Bytes before the body: magic, layout, padding to a cache line.
pub const HEADER: usize = 64;

/// A shared, writable mapping of a file: header plus `body_len` bytes.
pub struct SharedMapping {
    base: NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping stays valid until drop; what lives in it is accessed
// through atomics only.
unsafe impl Send for SharedMapping {}
// SAFETY: as above.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `path` (created when missing) with a body of `body_len` bytes.
    /// A file of another size, `magic` or `layout` has its body zeroed
    /// first (with a warning when it held something else).
    pub fn open(path: &Path, body_len: usize, magic: u64, layout: u64) -> Result<SharedMapping, StorageError> {
        let len = HEADER + body_len;
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path).at(path)?;
        if file.metadata().at(path)?.len() != len as u64 {
            file.set_len(0).and_then(|_| file.set_len(len as u64)).at(path)?;
        }
        // SAFETY: a fresh shared mapping of `len` bytes of a file we hold
        // open; the kernel keeps it after the file is closed.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).at(path);
        }
        let base = NonNull::new(base).ok_or_else(|| std::io::Error::other("mmap returned NULL")).at(path)?;
        let mapping = SharedMapping { base, len };
        let header = mapping.header();
        let (found_magic, found_layout) = (header[0].load(Ordering::SeqCst), header[1].load(Ordering::SeqCst));
        if found_magic != magic || found_layout != layout {
            if found_magic != 0 {
                tracing::warn!("{}: written with another layout; starting it from zero", path.display());
            }
            // SAFETY: our writable mapping of `body_len` bytes after the header.
            unsafe { std::ptr::write_bytes(mapping.body().as_ptr(), 0, body_len) };
            header[1].store(layout, Ordering::SeqCst);
            header[0].store(magic, Ordering::SeqCst);
        }
        Ok(mapping)
    }

    fn header(&self) -> &[AtomicU64; 2] {
        // SAFETY: page-aligned mapping of at least HEADER bytes; atomics
        // are valid for any bit pattern.
        unsafe { &*(self.base.as_ptr() as *const [AtomicU64; 2]) }
    }

    /// The first byte of the body (8-byte aligned: HEADER is 64).
    pub fn body(&self) -> NonNull<u8> {
        // SAFETY: HEADER < len, inside the mapping.
        unsafe { NonNull::new_unchecked(self.base.as_ptr().cast::<u8>().add(HEADER)) }
    }

    /// The body as `count` atomics; `count * 8` must not exceed the body.
    pub fn slots(&self, count: usize) -> &[AtomicU64] {
        assert!(HEADER + count * 8 <= self.len, "slots beyond the mapping");
        // SAFETY: in bounds (checked), aligned, atomics valid for any bits,
        // alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.body().as_ptr().cast::<AtomicU64>(), count) }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in open, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr(), self.len) };
    }
}
