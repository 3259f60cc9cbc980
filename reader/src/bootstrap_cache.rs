//! [`BootstrapCache`]: decoded, validated bootstraps kept on local disk, so
//! that a mount of an image opened before (a remount, a restarted daemon, a
//! live upgrade) maps its bootstrap instead of fetching, checking,
//! inflating and validating it again.
//!
//! A bootstrap is stored as `<dir>/<sha256 of its layer>`: the raw bytes,
//! written to a temporary name, fsync'd and renamed, then marked
//! ([`naiad_registry::verified_file`]) with the layer digest. Opening maps the file
//! read-only (zero-copy) if its marker still matches; header and table
//! bounds are checked again, the checksum and the full validation are not
//! (the marker vouches that the bytes are those validated). Anything else
//! (no file, no marker, a changed file) falls back to the layer, and the
//! result is stored again. The directory keeps the [`KEEP`] most recently
//! stored bootstraps.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use naiad_format::Bootstrap;

use naiad_registry::verified_file::{self, MarkerState};
use naiad_registry::Digest;

/// Bootstraps a cache directory keeps.
pub const KEEP: usize = 32;

/// A read-only shared mapping of a whole file.
struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: a read-only mapping, never written through, unmapped on drop.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn of(file: &File) -> io::Result<Mapping> {
        let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
        if len == 0 {
            return Err(io::Error::other("empty file"));
        }
        // SAFETY: a fresh read-only private mapping of `len` bytes of an open
        // file; the kernel keeps it after the file is closed.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` readable bytes, alive until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// A directory of decoded bootstraps (see the module comment).
#[derive(Debug, Clone)]
pub struct BootstrapCache {
    dir: PathBuf,
    /// Stores still being written ([`BootstrapCache::wait`]).
    writers: Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

impl BootstrapCache {
    pub fn new(dir: &Path) -> Self {
        BootstrapCache { dir: dir.to_path_buf(), writers: Arc::default() }
    }

    /// Waits for the stores still being written (a daemon calls this before
    /// it exits, or its first mount's bootstrap would never be kept).
    pub fn wait(&self) {
        let writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in writers {
            let _ = w.join();
        }
    }

    fn path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(layer.hex())
    }

    /// The bootstrap of `layer`, if this cache holds it unchanged.
    pub fn load(&self, layer: &Digest) -> Option<Bootstrap> {
        let path = self.path(layer);
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME).open(&path).ok()?;
        match verified_file::check(&path, &file, layer.as_str()) {
            Ok(MarkerState::Valid) => {}
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!("bootstrap cache: {}: {e}", path.display());
                return None;
            }
        }
        let mapping = Mapping::of(&file).map_err(|e| tracing::debug!("bootstrap cache: mapping {}: {e}", path.display())).ok()?;
        match Bootstrap::from_shared(Arc::new(mapping), false) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!("bootstrap cache: {}: {e}; removing it", path.display());
                let _ = verified_file::remove(&path);
                None
            }
        }
    }

    /// Keeps `bootstrap` (checked and validated) as the one of `layer`, on
    /// a thread of its own: writing and fsync'ing it is no reason for a
    /// mount to wait. Failures are logged: the cache only saves time. A
    /// write cut short leaves a temporary file, removed by a later store.
    pub fn store(&self, layer: &Digest, bootstrap: &Bootstrap) {
        let (cache, layer, bootstrap) = (BootstrapCache::new(&self.dir), layer.clone(), bootstrap.clone());
        let spawned = std::thread::Builder::new().name("naiad-bootstrap-cache".into()).spawn(move || {
            if let Err(e) = cache.try_store(&layer, &bootstrap) {
                tracing::debug!("bootstrap cache: cannot keep {} in {}: {e}", layer, cache.dir.display());
            }
        });
        match spawned {
            Ok(w) => self.writers.lock().unwrap_or_else(|p| p.into_inner()).push(w),
            Err(e) => tracing::debug!("bootstrap cache: {e}"),
        }
    }

    fn try_store(&self, layer: &Digest, bootstrap: &Bootstrap) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        verified_file::create_marked(&self.path(layer), layer.as_str(), |f| f.write_all(bootstrap.as_bytes()))?;
        self.trim();
        Ok(())
    }

    /// Removes all but the [`KEEP`] newest bootstraps (and stray files).
    fn trim(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        let mut stored: Vec<(std::time::SystemTime, PathBuf)> =
            entries.flatten().filter(|e| e.file_name().len() == 64).filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path()))).collect();
        if stored.len() <= KEEP {
            return;
        }
        stored.sort();
        for (_, p) in &stored[..stored.len() - KEEP] {
            let _ = verified_file::remove(p);
        }
    }
}
