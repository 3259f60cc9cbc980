//! [`ChunkError`]: one chunk that could not be read, with the blob and
//! offset it was read from.

use thiserror::Error;

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
