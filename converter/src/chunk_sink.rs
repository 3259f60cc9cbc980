//! [`ChunkSink`]: where chunks go during conversion. It batches raw chunks,
//! hashes and compresses them on all cores, keeps one copy of each distinct
//! chunk (by blake3 digest) for the whole image, and appends new ones to the
//! blob being written. Memory stays bounded by the batch size.
//!
//! Small files are packed together: [`ChunkSink::add_small`] appends a
//! file's bytes to an open *chunk group* (one chunk holding several small
//! files, each file a piece of it) until the group reaches its size, so a
//! tree of small files compresses like a tar and costs one chunk record
//! per group, not per file. Identical small files are stored once.

use std::collections::HashMap;
use std::io::Write;

use naiad_format::{encode_chunk, BlobRecord, ChunkDigest, ChunkRecord};
use naiad_registry::layout::BlobWriter;
use naiad_registry::{Digest, OciLayout};
use rayon::prelude::*;

use crate::error::{ConvertError, Result};

/// Sequence number of a chunk handed to the sink, resolved to a chunk
/// index once its batch is flushed.
pub type ChunkSeq = u64;

/// Part of a file: `len` bytes of chunk `seq` from `chunk_offset` on. A
/// large file's pieces are whole chunks; a small file is one piece of a
/// chunk group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub seq: ChunkSeq,
    pub chunk_offset: u32,
    pub len: u32,
}

pub struct ChunkSink {
    layout: OciLayout,
    zstd_level: i32,
    /// Level for chunks going to the prefetch blob: fetched on every cold
    /// start, so worth compressing harder.
    prefetch_zstd_level: i32,
    batch_limit: usize,
    /// Queued chunks, each with whether it belongs in the prefetch blob.
    pending: Vec<(Vec<u8>, bool)>,
    pending_bytes: usize,
    /// Target size of a chunk group (uncompressed).
    group_size: usize,
    /// The open group of each destination (layer blob, prefetch blob): its
    /// position in `pending`. Groups close when full and at every flush.
    open_groups: [Option<usize>; 2],
    /// Where each distinct small file's bytes already are.
    small_by_digest: HashMap<ChunkDigest, Piece>,
    /// Chunk index of every flushed sequence number.
    seq_to_chunk: Vec<u32>,
    by_digest: HashMap<ChunkDigest, u32>,
    pub chunks: Vec<ChunkRecord>,
    pub blobs: Vec<BlobRecord>,
    current: Option<BlobWriter>,
    /// The blob holding the startup (prefetch) set, opened on first use and
    /// committed by [`ChunkSink::end_prefetch_blob`]; its chunks get their
    /// blob index then.
    prefetch: Option<BlobWriter>,
    prefetch_chunks: Vec<u32>,
    /// Blobs this conversion added to the layout (removed again on failure).
    pub created: Vec<Digest>,
    /// Uncompressed bytes handed to the sink.
    pub bytes_in: u64,
}

impl ChunkSink {
    pub fn new(layout: OciLayout, zstd_level: i32, prefetch_zstd_level: i32, batch_limit: usize, group_size: usize) -> Self {
        ChunkSink {
            layout,
            zstd_level,
            prefetch_zstd_level,
            batch_limit,
            pending: Vec::new(),
            pending_bytes: 0,
            group_size,
            open_groups: [None, None],
            small_by_digest: HashMap::new(),
            seq_to_chunk: Vec::new(),
            by_digest: HashMap::new(),
            chunks: Vec::new(),
            blobs: Vec::new(),
            current: None,
            prefetch: None,
            prefetch_chunks: Vec::new(),
            created: Vec::new(),
            bytes_in: 0,
        }
    }

    /// Starts the blob that new chunks are appended to.
    pub fn begin_blob(&mut self) -> Result<()> {
        self.current = Some(self.layout.blob_writer()?);
        Ok(())
    }

    /// Queues a chunk and returns its sequence number. A new chunk marked
    /// `prefetch` goes to the prefetch blob instead of the layer's blob.
    pub fn add(&mut self, data: Vec<u8>, prefetch: bool) -> Result<ChunkSeq> {
        let seq = (self.seq_to_chunk.len() + self.pending.len()) as ChunkSeq;
        self.bytes_in += data.len() as u64;
        self.pending_bytes += data.len();
        self.pending.push((data, prefetch));
        if self.pending_bytes >= self.batch_limit {
            self.flush()?;
        }
        Ok(seq)
    }

    /// Packs a small file into the open chunk group of its destination (a
    /// new one when it does not fit) and returns where its bytes are. A
    /// file identical to one added before gets that file's piece.
    pub fn add_small(&mut self, data: &[u8], prefetch: bool) -> Result<Piece> {
        self.bytes_in += data.len() as u64;
        let digest = *blake3::hash(data).as_bytes();
        if let Some(&piece) = self.small_by_digest.get(&digest) {
            return Ok(piece);
        }
        let slot = &mut self.open_groups[prefetch as usize];
        let group = match *slot {
            Some(g) if self.pending[g].0.len() + data.len() <= self.group_size => g,
            _ => {
                self.pending.push((Vec::with_capacity(self.group_size), prefetch));
                *slot = Some(self.pending.len() - 1);
                self.pending.len() - 1
            }
        };
        let seq = (self.seq_to_chunk.len() + group) as ChunkSeq;
        let bytes = &mut self.pending[group].0;
        let piece = Piece { seq, chunk_offset: bytes.len() as u32, len: data.len() as u32 };
        bytes.extend_from_slice(data);
        self.small_by_digest.insert(digest, piece);
        self.pending_bytes += data.len();
        if self.pending_bytes >= self.batch_limit {
            self.flush()?;
        }
        Ok(piece)
    }

    /// The chunk index of a flushed sequence number.
    pub fn chunk_index(&self, seq: ChunkSeq) -> Option<u32> {
        self.seq_to_chunk.get(seq as usize).copied()
    }

    /// Hashes the queued chunks, compresses the new ones and appends them.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        self.open_groups = [None, None];
        let digests: Vec<ChunkDigest> = pending.par_iter().map(|(d, _)| *blake3::hash(d).as_bytes()).collect();
        // Decide which chunks are new, in order; duplicates inside the batch count once.
        let mut fresh: Vec<usize> = Vec::new();
        let mut batch_first: HashMap<ChunkDigest, usize> = HashMap::new();
        for (i, d) in digests.iter().enumerate() {
            if !self.by_digest.contains_key(d) && !batch_first.contains_key(d) {
                batch_first.insert(*d, i);
                fresh.push(i);
            }
        }
        let (level, prefetch_level) = (self.zstd_level, self.prefetch_zstd_level);
        let encoded: Vec<_> = fresh
            .par_iter()
            .map(|&i| {
                let (data, to_prefetch) = (&pending[i].0, pending[i].1);
                (encode_chunk(data, if to_prefetch { prefetch_level } else { level }), to_prefetch)
            })
            .collect();
        for (e, to_prefetch) in encoded {
            let index = self.chunks.len() as u32;
            let (writer, blob_index) = if to_prefetch {
                if self.prefetch.is_none() {
                    self.prefetch = Some(self.layout.blob_writer()?);
                }
                self.prefetch_chunks.push(index);
                // The real index is known once the prefetch blob is committed.
                (self.prefetch.as_mut(), u32::MAX)
            } else {
                (self.current.as_mut(), self.blobs.len() as u32)
            };
            let writer = writer.ok_or_else(|| ConvertError::Invalid("chunk added outside a blob".into()))?;
            let offset = writer.bytes_written();
            writer.write_all(&e.stored).map_err(|source| ConvertError::Io { path: "blob".into(), source })?;
            self.chunks.push(ChunkRecord {
                digest: e.digest,
                compressed_offset: offset,
                blob_index,
                compressed_size: e.stored.len() as u32,
                uncompressed_size: e.uncompressed_size,
            });
            self.by_digest.insert(e.digest, index);
        }
        for d in &digests {
            // Every digest is in the map now: either from before or just written.
            let index = self.by_digest.get(d).copied().ok_or_else(|| ConvertError::Invalid("chunk lost during flush".into()))?;
            self.seq_to_chunk.push(index);
        }
        Ok(())
    }

    /// Flushes and commits the current blob under its digest. A blob that
    /// received no chunk is discarded.
    pub fn end_blob(&mut self) -> Result<()> {
        self.flush()?;
        let Some(writer) = self.current.take() else { return Ok(()) };
        if writer.bytes_written() == 0 {
            return Ok(());
        }
        let (digest, size) = writer.commit()?;
        self.created.push(digest.clone());
        self.blobs.push(BlobRecord { sha256: digest.bytes(), size });
        Ok(())
    }

    /// Flushes and commits the prefetch blob, if any chunk went there, and
    /// gives its chunks their blob index.
    pub fn end_prefetch_blob(&mut self) -> Result<()> {
        self.flush()?;
        let Some(writer) = self.prefetch.take() else { return Ok(()) };
        let (digest, size) = writer.commit()?;
        let index = self.blobs.len() as u32;
        for &c in &self.prefetch_chunks {
            self.chunks[c as usize].blob_index = index;
        }
        self.created.push(digest.clone());
        self.blobs.push(BlobRecord { sha256: digest.bytes(), size });
        Ok(())
    }
}
