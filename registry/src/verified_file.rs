//! Markers that say a local file was verified and has not changed since:
//! `<file>.ok` holds a tag (what the file is, e.g. its key) and the inode
//! number, size and ctime the file had when it was marked. Anything that
//! writes to the file, or replaces it, changes its ctime or inode, so a
//! marker that still matches `fstat` vouches for the bytes without reading
//! them again. A marker is written atomically (temporary name, fsync,
//! rename), after the file itself is complete and in place.
//!
//! Used for caches of derived files: decoded bootstraps here, whole-file
//! backing files in the daemon.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a marker file's name adds to its file's.
pub const MARKER_SUFFIX: &str = ".ok";
const MAGIC: &str = "naiad-verified-v1";

/// The marker of the file at `path`.
pub fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(MARKER_SUFFIX);
    PathBuf::from(name)
}

fn marker_text(tag: &str, meta: &fs::Metadata) -> String {
    format!("{MAGIC} {tag} {} {} {} {}\n", meta.ino(), meta.len(), meta.ctime(), meta.ctime_nsec())
}

/// What [`check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerState {
    /// The marker vouches for the file as it is now.
    Valid,
    /// There is a marker, but the file changed since (or it names another tag).
    Stale,
    /// No marker: the file was never completed and verified.
    Missing,
}

/// Whether the marker of `path` (opened as `file`) vouches for it as `tag`.
pub fn check(path: &Path, file: &File, tag: &str) -> io::Result<MarkerState> {
    let meta = file.metadata()?;
    let text = match fs::read_to_string(marker_path(path)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(MarkerState::Missing),
        Err(e) => return Err(e),
    };
    Ok(if meta.is_file() && text == marker_text(tag, &meta) { MarkerState::Valid } else { MarkerState::Stale })
}

/// A name for a temporary file in `dir`, unique within this process.
pub fn temp_path(dir: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(".tmp-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)))
}

/// Marks the file at `path` as verified as `tag`, as it is now.
pub fn mark(path: &Path, tag: &str) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let tmp = temp_path(path.parent().unwrap_or(Path::new(".")));
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        f.write_all(marker_text(tag, &meta).as_bytes())?;
        f.sync_data()?;
        fs::rename(&tmp, marker_path(path))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Creates the file at `path` and marks it as `tag`: `fill` writes it under
/// a temporary name beside `path`, which is fsync'd and renamed into place
/// before the marker is written. On failure the temporary file is gone and
/// nothing at `path` is marked (a file renamed into place but not marked is
/// never trusted).
pub fn create_marked(path: &Path, tag: &str, fill: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    let tmp = temp_path(path.parent().unwrap_or(Path::new(".")));
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        mark(path, tag)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Removes the file at `path` and its marker, the marker first (so no
/// marker is left vouching for a file that is gone or replaced). Either
/// being absent already is not an error.
pub fn remove(path: &Path) -> io::Result<()> {
    for p in [marker_path(path), path.to_path_buf()] {
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_vouches_until_the_file_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"hello").unwrap();
        let open = || File::open(&p).unwrap();
        assert_eq!(check(&p, &open(), "t").unwrap(), MarkerState::Missing);
        mark(&p, "t").unwrap();
        assert_eq!(check(&p, &open(), "t").unwrap(), MarkerState::Valid);
        assert_eq!(check(&p, &open(), "other").unwrap(), MarkerState::Stale);
        // A write in place, even of the same bytes, changes the ctime.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::os::unix::fs::FileExt::write_all_at(&OpenOptions::new().write(true).open(&p).unwrap(), b"h", 0).unwrap();
        assert_eq!(check(&p, &open(), "t").unwrap(), MarkerState::Stale);
        remove(&p).unwrap();
        assert!(!p.exists() && !marker_path(&p).exists());
        remove(&p).unwrap();
    }
}
