//! Where chunk bytes come from. [`ChunkFetcher`] is the interface the
//! daemon's caches load through (tests give it stand-ins);
//! [`ChunkReader`] is the one real implementation, and the one chunk reader
//! of naiad: the FUSE daemon, its prefetcher, `naiad check`, `naiad unpack`
//! and the chunk dictionary of `naiad convert` all read chunks with it.
//!
//! A [`ChunkReader`] reads the chunks of an opened [`NaiadImage`] from its
//! [`naiad_registry::BlobStore`] (a local OCI layout, or a registry with HTTP
//! range requests): the chunks asked for are planned into requests by
//! [`crate::fetch_plan::plan`] under the reader's [`MergeLimits`], each
//! request is one `read_range` of the store (several run at once), and
//! every chunk is cut out of its request's bytes, decompressed and checked
//! against its digest. A result carries the chunk's stored bytes next to
//! the decoded ones, so the disk cache can keep them as they are in the
//! blob.

use std::collections::HashMap;
use std::sync::Arc;

use naiad_format::bootstrap::hex;
use naiad_format::{decode_chunk, ChunkDigest, ChunkRecord};
use naiad_registry::Digest;

use crate::error::{ChunkError, ChunkErrorKind};
use crate::fetch_plan::{plan, MergeLimits, Request};
use crate::naiad_image::NaiadImage;

/// The raw sha256 of a blob, which names its files in the disk cache.
pub type BlobSha256 = [u8; 32];

/// Requests of one [`ChunkReader::read_chunks`] call in flight at once.
const PARALLEL_REQUESTS: usize = 4;

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

    /// Reads several chunks (a request planned under
    /// [`ChunkFetcher::merge_limits`]) with as few store requests as the
    /// source allows, handing each chunk's result to `each`, with its
    /// index in `chunks`, as soon as it is ready: the chunks at the front of
    /// a large request are usable before its end has arrived. Every index
    /// is handed over exactly once.
    fn fetch_many(&self, chunks: &[ChunkRecord], each: &mut dyn FnMut(usize, Result<FetchedChunk, ChunkError>)) {
        for (i, c) in chunks.iter().enumerate() {
            each(i, self.fetch(c));
        }
    }

    /// The limits requests to this source are planned under.
    fn merge_limits(&self) -> MergeLimits {
        MergeLimits::default()
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

/// Reads the chunks of an opened naiad image from its blob store.
pub struct ChunkReader {
    image: Arc<NaiadImage>,
    limits: MergeLimits,
    /// `image.blob_digests` as raw bytes, by blob index.
    blob_sha256: Vec<BlobSha256>,
}

fn chunk_error(chunk: &ChunkRecord, kind: ChunkErrorKind, blob: Option<String>, message: String) -> ChunkError {
    ChunkError { kind, digest: hex(&chunk.digest), blob, offset: chunk.compressed_offset, message }
}

impl ChunkReader {
    /// A reader of `image`'s chunks whose requests are planned under `limits`.
    pub fn new(image: Arc<NaiadImage>, limits: MergeLimits) -> Self {
        let blob_sha256 = image.blob_digests.iter().map(Digest::bytes).collect();
        ChunkReader { image, limits, blob_sha256 }
    }

    pub fn image(&self) -> &Arc<NaiadImage> {
        &self.image
    }

    /// Reads, decompresses and verifies chunk `index` of the bootstrap.
    pub fn read_chunk(&self, index: u32) -> Result<Vec<u8>, ChunkError> {
        let chunk = self.image.bootstrap.chunk(index).map_err(|e| ChunkError {
            kind: ChunkErrorKind::Unavailable,
            digest: String::new(),
            blob: None,
            offset: 0,
            message: format!("chunk index {index}: {e}"),
        })?;
        self.fetch(&chunk).map(|c| c.data)
    }

    /// Reads, decompresses and verifies `chunks` (of any blobs, in any
    /// order, duplicates allowed) in the requests [`plan`] makes of them,
    /// up to [`PARALLEL_REQUESTS`] at once. One result per chunk, in the
    /// order of `chunks`.
    pub fn read_chunks(&self, chunks: &[ChunkRecord]) -> Vec<Result<FetchedChunk, ChunkError>> {
        let requests = plan(chunks, &self.limits);
        let mut by_digest: HashMap<ChunkDigest, Result<FetchedChunk, ChunkError>> = HashMap::with_capacity(chunks.len());
        let collect = |r: &Request| {
            let mut out = Vec::with_capacity(r.chunks.len());
            self.read_request(r, &mut |c, result| out.push((c.digest, result)));
            out
        };
        if requests.len() == 1 {
            by_digest.extend(collect(&requests[0]));
        } else {
            for group in requests.chunks(PARALLEL_REQUESTS) {
                std::thread::scope(|scope| {
                    let handles: Vec<_> = group.iter().map(|r| scope.spawn(move || collect(r))).collect();
                    for (h, r) in handles.into_iter().zip(group) {
                        match h.join() {
                            Ok(results) => by_digest.extend(results),
                            Err(_) => {
                                by_digest.extend(r.chunks.iter().map(|c| (c.digest, Err(chunk_error(c, ChunkErrorKind::Unavailable, None, "the reading thread panicked".into())))))
                            }
                        }
                    }
                });
            }
        }
        chunks
            .iter()
            .map(|c| match by_digest.get(&c.digest) {
                Some(r) => r.clone(),
                None => Err(chunk_error(c, ChunkErrorKind::Unavailable, None, "not planned (cannot happen)".into())),
            })
            .collect()
    }

    /// One request: one store read of the bytes it spans, cut into its
    /// chunks, each decoded, verified and handed to `each` as soon as its
    /// last byte has arrived (in the order the chunks end in the blob).
    /// Every chunk of the request is handed over exactly once.
    fn read_request(&self, r: &Request, each: &mut dyn FnMut(&ChunkRecord, Result<FetchedChunk, ChunkError>)) {
        let Some(blob) = self.image.blob_digests.get(r.blob_index as usize) else {
            for c in &r.chunks {
                each(c, Err(chunk_error(c, ChunkErrorKind::Unavailable, None, format!("blob index {} out of range", c.blob_index))));
            }
            return;
        };
        let mut by_end: Vec<&ChunkRecord> = r.chunks.iter().collect();
        by_end.sort_by_key(|c| c.compressed_offset + c.compressed_size as u64);
        let mut ready = 0;
        // The chunks that lie wholly within `prefix` (the request's bytes
        // from its start) and were not handed over yet.
        let mut hand_over = |prefix: &[u8], each: &mut dyn FnMut(&ChunkRecord, Result<FetchedChunk, ChunkError>)| {
            while let Some(c) = by_end.get(ready) {
                let start = (c.compressed_offset - r.offset) as usize;
                let Some(stored) = prefix.get(start..start + c.compressed_size as usize) else { break };
                let result = match decode_chunk(stored, c) {
                    Ok(data) => Ok(FetchedChunk { stored: stored.to_vec(), data }),
                    Err(e) => Err(chunk_error(c, ChunkErrorKind::Corrupt, Some(blob.to_string()), format!("blob {blob} at offset {}: {e}", c.compressed_offset))),
                };
                each(c, result);
                ready += 1;
            }
        };
        let started = std::time::Instant::now();
        let read = self.image.store.read_range_progressive(blob, r.offset, r.len, &mut |prefix| hand_over(prefix, each));
        tracing::debug!("read {} bytes ({} chunks) at {} of blob {blob} in {:?}", r.len, r.chunks.len(), r.offset, started.elapsed());
        let problem = match read {
            Ok(span) => {
                hand_over(&span, each);
                format!("the store returned {} of {} bytes", span.len(), r.len)
            }
            Err(e) => e.to_string(),
        };
        for c in &by_end[ready..] {
            each(c, Err(chunk_error(c, ChunkErrorKind::Unavailable, Some(blob.to_string()), format!("blob {blob} at offset {}: {problem}", c.compressed_offset))));
        }
    }
}

impl ChunkFetcher for ChunkReader {
    fn fetch(&self, chunk: &ChunkRecord) -> Result<FetchedChunk, ChunkError> {
        let mut results = self.read_chunks(std::slice::from_ref(chunk));
        results.pop().unwrap_or_else(|| Err(chunk_error(chunk, ChunkErrorKind::Unavailable, None, "no result".into())))
    }

    fn fetch_many(&self, chunks: &[ChunkRecord], each: &mut dyn FnMut(usize, Result<FetchedChunk, ChunkError>)) {
        let mut positions: HashMap<ChunkDigest, Vec<usize>> = HashMap::with_capacity(chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            positions.entry(c.digest).or_default().push(i);
        }
        for request in plan(chunks, &self.limits) {
            self.read_request(&request, &mut |c, result| {
                if let Some((last, others)) = positions.get(&c.digest).and_then(|p| p.split_last()) {
                    for &i in others {
                        each(i, result.clone());
                    }
                    each(*last, result);
                }
            });
        }
    }

    fn merge_limits(&self) -> MergeLimits {
        self.limits
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
