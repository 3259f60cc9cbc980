//! [`ChunkFetcher`]: where chunk bytes come from. The daemon's read path
//! only sees this trait; [`StoreChunkFetcher`] reads through an opened
//! [`NaiadImage`]'s [`naiad_registry::BlobStore`] (a local OCI layout, or a
//! registry with HTTP range requests). Several chunks of one blob are read
//! with one [`naiad_registry::BlobStore::read_ranges`] call, which a
//! registry store turns into one request when they lie close together.

use std::sync::Arc;

use naiad_format::bootstrap::hex;
use naiad_format::{decode_chunk, ChunkRecord};
use naiad_registry::{ChunkReadError, NaiadImage};

use crate::error::{ChunkError, ChunkErrorKind};

/// Reads chunks from their blob, decompresses them and verifies their
/// digests. Implementations must never return bytes that do not match
/// `chunk.digest`.
pub trait ChunkFetcher: Send + Sync {
    fn fetch(&self, chunk: &ChunkRecord) -> Result<Vec<u8>, ChunkError>;

    /// Reads several chunks of one blob (the caller groups them so), as one
    /// request where the source allows it; one result per chunk, in order.
    fn fetch_many(&self, chunks: &[ChunkRecord]) -> Vec<Result<Vec<u8>, ChunkError>> {
        chunks.iter().map(|c| self.fetch(c)).collect()
    }

    /// Retries the source itself made so far (a registry client retrying a
    /// failed request), if it counts them.
    fn retries(&self) -> u64 {
        0
    }

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

fn chunk_error(chunk: &ChunkRecord, kind: ChunkErrorKind, blob: Option<String>, message: String) -> ChunkError {
    ChunkError { kind, digest: hex(&chunk.digest), blob, offset: chunk.compressed_offset, message }
}

impl ChunkFetcher for StoreChunkFetcher {
    fn fetch(&self, chunk: &ChunkRecord) -> Result<Vec<u8>, ChunkError> {
        self.image.read_chunk_record(chunk).map_err(|e| {
            let (kind, blob) = match &e {
                ChunkReadError::NoSuchChunk(_) => (ChunkErrorKind::Unavailable, None),
                ChunkReadError::Store { blob, .. } => (ChunkErrorKind::Unavailable, Some(blob.clone())),
                ChunkReadError::Corrupt { blob, .. } => (ChunkErrorKind::Corrupt, Some(blob.clone())),
            };
            chunk_error(chunk, kind, blob, e.to_string())
        })
    }

    fn fetch_many(&self, chunks: &[ChunkRecord]) -> Vec<Result<Vec<u8>, ChunkError>> {
        let Some(first) = chunks.first() else { return Vec::new() };
        if chunks.len() == 1 {
            return vec![self.fetch(first)];
        }
        let Some(blob) = self.image.blob_digests.get(first.blob_index as usize) else {
            return chunks.iter().map(|c| Err(chunk_error(c, ChunkErrorKind::Unavailable, None, format!("blob index {} out of range", c.blob_index)))).collect();
        };
        if chunks.iter().any(|c| c.blob_index != first.blob_index) {
            // Not one blob: the caller did not group them; read one by one.
            return chunks.iter().map(|c| self.fetch(c)).collect();
        }
        let ranges: Vec<(u64, u64)> = chunks.iter().map(|c| (c.compressed_offset, c.compressed_size as u64)).collect();
        match self.image.store.read_ranges(blob, &ranges) {
            Ok(parts) if parts.len() == chunks.len() => chunks
                .iter()
                .zip(parts)
                .map(|(c, stored)| {
                    decode_chunk(&stored, c).map_err(|e| chunk_error(c, ChunkErrorKind::Corrupt, Some(blob.to_string()), format!("blob {blob} at offset {}: {e}", c.compressed_offset)))
                })
                .collect(),
            Ok(parts) => chunks
                .iter()
                .map(|c| Err(chunk_error(c, ChunkErrorKind::Unavailable, Some(blob.to_string()), format!("blob {blob}: the store returned {} ranges for {} asked", parts.len(), chunks.len()))))
                .collect(),
            Err(e) => chunks
                .iter()
                .map(|c| Err(chunk_error(c, ChunkErrorKind::Unavailable, Some(blob.to_string()), format!("blob {blob} at offset {}: {e}", c.compressed_offset))))
                .collect(),
        }
    }

    fn retries(&self) -> u64 {
        self.image.registry_stats().map(|s| s.retries).unwrap_or(0)
    }

    fn describe(&self) -> String {
        self.image.store.describe()
    }
}
