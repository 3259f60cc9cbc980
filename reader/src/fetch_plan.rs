//! Planning store requests: which chunks are read together. This is the
//! only place naiad merges ranges: the FUSE daemon (a read's missing
//! chunks, read-ahead windows, the prefetch set, `--fetch-all`), `naiad
//! check` and `naiad unpack` all plan with [`plan`] under one
//! [`MergeLimits`], and a store fetches exactly the requests planned.
//!
//! Chunks of one blob whose stored bytes lie close together (gap at most
//! [`MergeLimits::gap`] bytes) are read with one range request, as long as
//! the request stays within [`MergeLimits::max_request`] bytes; a longer run
//! is split into several requests.

use std::collections::{HashMap, HashSet};

use naiad_format::ChunkRecord;
use serde::{Deserialize, Serialize};

/// How far apart chunks may lie to be read with one request, and how large
/// one request may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeLimits {
    /// Largest gap (bytes of other chunks) between two chunks read with one
    /// request: reading it costs less than another round trip
    /// (`--range-merge-gap`).
    pub gap: u64,
    /// Largest request (bytes spanned) (`--max-request`).
    pub max_request: u64,
}

impl MergeLimits {
    /// 64 KiB: about 5 ms at 100 Mbit/s, a quarter of a 20 ms round trip.
    pub const DEFAULT_GAP: u64 = 64 << 10;
    /// 8 MiB: the largest read-ahead window, and at most one request per
    /// 8 MiB when a whole blob is read (`unpack`, `check`).
    pub const DEFAULT_MAX_REQUEST: u64 = 8 << 20;
}

impl Default for MergeLimits {
    fn default() -> Self {
        MergeLimits { gap: Self::DEFAULT_GAP, max_request: Self::DEFAULT_MAX_REQUEST }
    }
}

/// One planned store request: chunks of one blob, by offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub blob_index: u32,
    pub chunks: Vec<ChunkRecord>,
    /// Blob offset and length of the bytes the request spans.
    pub offset: u64,
    pub len: u64,
    /// Stored bytes of its chunks (`len` minus the gaps).
    pub bytes: u64,
    /// Position (in the input) of its most urgent chunk.
    pub priority: usize,
}

fn end(c: &ChunkRecord) -> u64 {
    c.compressed_offset.saturating_add(c.compressed_size as u64)
}

/// Groups `chunks` (most urgent first; duplicates by digest are dropped)
/// into requests under `limits`, returned most urgent first.
pub fn plan(chunks: &[ChunkRecord], limits: &MergeLimits) -> Vec<Request> {
    let MergeLimits { gap, max_request } = *limits;
    let mut seen = HashSet::new();
    let mut by_blob: HashMap<u32, Vec<(usize, ChunkRecord)>> = HashMap::new();
    for (pos, c) in chunks.iter().enumerate() {
        if seen.insert(c.digest) {
            by_blob.entry(c.blob_index).or_default().push((pos, *c));
        }
    }
    let mut out = Vec::new();
    for (blob_index, mut list) in by_blob {
        list.sort_by_key(|(pos, c)| (c.compressed_offset, *pos));
        let mut cur: Option<Request> = None;
        for (pos, c) in list {
            if let Some(r) = cur.as_mut() {
                let r_end = r.offset + r.len;
                let new_end = r_end.max(end(&c));
                if c.compressed_offset <= r_end.saturating_add(gap) && new_end - r.offset <= max_request {
                    r.len = new_end - r.offset;
                    r.bytes += c.compressed_size as u64;
                    r.priority = r.priority.min(pos);
                    r.chunks.push(c);
                    continue;
                }
            }
            if let Some(r) = cur.take() {
                out.push(r);
            }
            cur = Some(Request { blob_index, chunks: vec![c], offset: c.compressed_offset, len: c.compressed_size as u64, bytes: c.compressed_size as u64, priority: pos });
        }
        out.extend(cur);
    }
    out.sort_by_key(|r| (r.priority, r.blob_index, r.offset));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, blob: u32, offset: u64, size: u32) -> ChunkRecord {
        ChunkRecord { digest: [n; 32], blob_index: blob, compressed_offset: offset, compressed_size: size, uncompressed_size: size }
    }

    #[test]
    fn merges_near_chunks_of_one_blob() {
        let chunks = [
            chunk(1, 0, 1000, 100),
            chunk(2, 1, 0, 10),
            chunk(3, 0, 0, 1000),
            chunk(4, 0, 100_000, 10),
            chunk(5, 0, 1100, 50),
            chunk(1, 0, 1000, 100), // duplicate
        ];
        let p = plan(&chunks, &MergeLimits { gap: 1000, max_request: 1 << 20 });
        assert_eq!(p.len(), 3);
        // Blob 0's first run holds chunks 3, 1, 5 by offset; its priority is chunk 1's.
        assert_eq!(p[0].chunks.iter().map(|c| c.digest[0]).collect::<Vec<_>>(), vec![3, 1, 5]);
        assert_eq!((p[0].offset, p[0].len, p[0].bytes, p[0].priority), (0, 1150, 1150, 0));
        assert_eq!((p[1].blob_index, p[1].priority), (1, 1));
        assert_eq!((p[2].offset, p[2].priority), (100_000, 3));
    }

    #[test]
    fn splits_long_runs() {
        let chunks: Vec<ChunkRecord> = (0..10u8).map(|i| chunk(i, 0, i as u64 * 100, 100)).collect();
        let p = plan(&chunks, &MergeLimits { gap: 0, max_request: 300 });
        assert_eq!(p.iter().map(|r| r.chunks.len()).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
        assert!(p.iter().all(|r| r.len <= 300));
        // A chunk larger than the cap is a request of its own.
        let p = plan(&[chunk(1, 0, 0, 1000), chunk(2, 0, 1000, 10)], &MergeLimits { gap: 0, max_request: 300 });
        assert_eq!(p.len(), 2);
    }
}
