//! [`ChunkError`]: one chunk that could not be read, with the blob and
//! offset it was read from; [`StorageError`]: a file or directory the
//! caches or the counters live in could not be set up.

use std::path::PathBuf;

use thiserror::Error;

/// A file or directory of the disk cache or of the shared counters could
/// not be opened, created or mapped.
#[derive(Debug, Error)]
#[error("{path}: {source}")]
pub struct StorageError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Attaches a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, StorageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, StorageError> {
        self.map_err(|source| StorageError { path: path.into(), source })
    }
}

/// Whether a chunk could not be read at all or was read and found bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkErrorKind {
    /// The store could not deliver the bytes (missing blob, I/O error, ...).
    Unavailable,
    /// The bytes arrived but did not decompress or verify.
    Corrupt,
}

/// One chunk that could not be read. Cloneable so every reader waiting on
/// the same load gets the same answer.
#[derive(Debug, Clone, Error)]
#[error("chunk {digest}: {message}")]
pub struct ChunkError {
    pub kind: ChunkErrorKind,
    /// Hex blake3 digest of the chunk.
    pub digest: String,
    /// The blob the chunk lives in, when known.
    pub blob: Option<String>,
    /// Offset of the chunk's stored bytes inside the blob.
    pub offset: u64,
    /// What went wrong, naming blob and offset.
    pub message: String,
}
