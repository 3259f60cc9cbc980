//! [`ChunkFetcher`]: where chunk bytes come from. The daemon's read path
//! only sees this trait, so a fetcher doing HTTP range requests against a
//! registry plugs in beside [`StoreChunkFetcher`], which reads through an
//! opened [`NaiadImage`]'s [`naiad_registry::BlobStore`].

use std::sync::Arc;

use naiad_format::bootstrap::hex;
use naiad_format::ChunkRecord;
use naiad_registry::{ChunkReadError, NaiadImage};

use crate::error::{ChunkError, ChunkErrorKind};

/// Reads one chunk from its blob, decompresses it and verifies its digest.
/// Implementations must never return bytes that do not match
/// `chunk.digest`.
pub trait ChunkFetcher: Send + Sync {
    fn fetch(&self, chunk: &ChunkRecord) -> Result<Vec<u8>, ChunkError>;
    /// A short description of the source for logs (`oci:/path`).
    fn describe(&self) -> String;
}

/// Fetches chunks from the blob store of an opened naiad image.
pub struct StoreChunkFetcher {
    image: Arc<NaiadImage>,
}

impl StoreChunkFetcher {
    pub fn new(image: Arc<NaiadImage>) -> Self {
        StoreChunkFetcher { image }
    }
}

impl ChunkFetcher for StoreChunkFetcher {
    fn fetch(&self, chunk: &ChunkRecord) -> Result<Vec<u8>, ChunkError> {
        self.image.read_chunk_record(chunk).map_err(|e| {
            let (kind, blob) = match &e {
                ChunkReadError::NoSuchChunk(_) => (ChunkErrorKind::Unavailable, None),
                ChunkReadError::Store { blob, .. } => (ChunkErrorKind::Unavailable, Some(blob.clone())),
                ChunkReadError::Corrupt { blob, .. } => (ChunkErrorKind::Corrupt, Some(blob.clone())),
            };
            ChunkError { kind, digest: hex(&chunk.digest), blob, offset: chunk.compressed_offset, message: e.to_string() }
        })
    }

    fn describe(&self) -> String {
        self.image.store.describe()
    }
}
