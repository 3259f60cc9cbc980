//! [`ChunkFetcher`]: where chunk bytes come from. The daemon's read path
//! only sees this trait; [`StoreChunkFetcher`] reads through an opened
//! [`NaiadImage`]'s [`naiad_registry::BlobStore`] (a local OCI layout, or a
//! registry with HTTP range requests). Several chunks of one blob are read
//! with one [`naiad_registry::BlobStore::read_ranges`] call, which a
//! registry store turns into one request when they lie close together.
//! A fetch hands back the chunk's stored bytes next to the decoded ones, so
//! the disk cache can keep them as they are in the blob.

use std::sync::Arc;

use naiad_format::bootstrap::hex;
use naiad_format::{decode_chunk, ChunkRecord};
use naiad_registry::{Digest, NaiadImage};

use crate::disk_cache::BlobSha256;
use crate::error::{ChunkError, ChunkErrorKind};

/// One chunk read from its blob: the bytes as stored there (what the disk
/// cache keeps) and the verified, decompressed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedChunk {
    /// The chunk's bytes as in the blob (a zstd frame, or raw).
    pub stored: Vec<u8>,
    /// Decompressed and checked against the chunk's digest.
    pub data: Vec<u8>,
}

/// Reads chunks from their blob, decompresses them and verifies their
/// digests. Implementations must never return bytes that do not match
/// `chunk.digest`.
pub trait ChunkFetcher: Send + Sync {
    fn fetch(&self, chunk: &ChunkRecord) -> Result<FetchedChunk, ChunkError>;

    /// Reads several chunks of one blob (the caller groups them so), as one
    /// request where the source allows it; one result per chunk, in order.
    fn fetch_many(&self, chunks: &[ChunkRecord]) -> Vec<Result<FetchedChunk, ChunkError>> {
        chunks.iter().map(|c| self.fetch(c)).collect()
    }

    /// The sha256 of blob `blob_index`, which names its files in the disk
    /// cache; `None` keeps that blob's chunks out of the disk cache.
    fn blob_sha256(&self, blob_index: u32) -> Option<BlobSha256>;

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
    /// `image.blob_digests` as raw bytes, by blob index.
    blob_sha256: Vec<BlobSha256>,
}

impl StoreChunkFetcher {
    pub fn new(image: Arc<NaiadImage>) -> Self {
        let blob_sha256 = image.blob_digests.iter().map(Digest::bytes).collect();
        StoreChunkFetcher { image, blob_sha256 }
    }

    /// Decodes and verifies the stored bytes of `chunk` read from `blob`.
    fn decode(blob: &Digest, chunk: &ChunkRecord, stored: Vec<u8>) -> Result<FetchedChunk, ChunkError> {
        match decode_chunk(&stored, chunk) {
            Ok(data) => Ok(FetchedChunk { stored, data }),
            Err(e) => Err(chunk_error(chunk, ChunkErrorKind::Corrupt, Some(blob.to_string()), format!("blob {blob} at offset {}: {e}", chunk.compressed_offset))),
        }
    }
}

fn chunk_error(chunk: &ChunkRecord, kind: ChunkErrorKind, blob: Option<String>, message: String) -> ChunkError {
    ChunkError { kind, digest: hex(&chunk.digest), blob, offset: chunk.compressed_offset, message }
}

fn no_such_blob(chunk: &ChunkRecord) -> ChunkError {
    chunk_error(chunk, ChunkErrorKind::Unavailable, None, format!("blob index {} out of range", chunk.blob_index))
}

impl ChunkFetcher for StoreChunkFetcher {
    fn fetch(&self, chunk: &ChunkRecord) -> Result<FetchedChunk, ChunkError> {
        let blob = self.image.blob_digests.get(chunk.blob_index as usize).ok_or_else(|| no_such_blob(chunk))?;
        let stored = self
            .image
            .store
            .read_range(blob, chunk.compressed_offset, chunk.compressed_size as u64)
            .map_err(|e| chunk_error(chunk, ChunkErrorKind::Unavailable, Some(blob.to_string()), format!("blob {blob} at offset {}: {e}", chunk.compressed_offset)))?;
        Self::decode(blob, chunk, stored)
    }

    fn fetch_many(&self, chunks: &[ChunkRecord]) -> Vec<Result<FetchedChunk, ChunkError>> {
        let Some(first) = chunks.first() else { return Vec::new() };
        if chunks.len() == 1 {
            return vec![self.fetch(first)];
        }
        let Some(blob) = self.image.blob_digests.get(first.blob_index as usize) else {
            return chunks.iter().map(|c| Err(no_such_blob(c))).collect();
        };
        if chunks.iter().any(|c| c.blob_index != first.blob_index) {
            // Not one blob: the caller did not group them; read one by one.
            return chunks.iter().map(|c| self.fetch(c)).collect();
        }
        let ranges: Vec<(u64, u64)> = chunks.iter().map(|c| (c.compressed_offset, c.compressed_size as u64)).collect();
        match self.image.store.read_ranges(blob, &ranges) {
            Ok(parts) if parts.len() == chunks.len() => chunks.iter().zip(parts).map(|(c, stored)| Self::decode(blob, c, stored)).collect(),
            Ok(parts) => chunks
                .iter()
                .map(|c| {
                    Err(chunk_error(
                        c,
                        ChunkErrorKind::Unavailable,
                        Some(blob.to_string()),
                        format!("blob {blob}: the store returned {} ranges for {} asked", parts.len(), chunks.len()),
                    ))
                })
                .collect(),
            Err(e) => chunks
                .iter()
                .map(|c| Err(chunk_error(c, ChunkErrorKind::Unavailable, Some(blob.to_string()), format!("blob {blob} at offset {}: {e}", c.compressed_offset))))
                .collect(),
        }
    }

    fn blob_sha256(&self, blob_index: u32) -> Option<BlobSha256> {
        self.blob_sha256.get(blob_index as usize).copied()
    }

    fn retries(&self) -> u64 {
        self.image.registry_stats().map(|s| s.retries).unwrap_or(0)
    }

    fn describe(&self) -> String {
        self.image.store.describe()
    }
}
