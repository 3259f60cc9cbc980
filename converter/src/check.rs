//! `naiad check`: the bootstrap is validated when the image is opened; then
//! every chunk of every blob is read and verified, and every blob's sha256
//! is recomputed. Each bad chunk is reported with the files (path and
//! offset) that use it.

use std::collections::HashMap;

use naiad_format::InodeKind;
use naiad_reader::ChunkReader;
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::error::Result;

#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub chunks_checked: u64,
    pub blobs_checked: u64,
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Chunks verified per batch.
const CHECK_BATCH: usize = 128;

/// Checks the image `reader` reads, every chunk read through it.
pub fn check(reader: &ChunkReader) -> Result<CheckReport> {
    let image = reader.image();
    let b = &image.bootstrap;
    let mut report = CheckReport::default();
    // Batches of neighbouring chunks, so a registry answers each batch with
    // a few merged range requests.
    let records: Vec<_> = (0..b.chunk_count()).map(|i| b.chunk(i)).collect::<std::result::Result<_, _>>()?;
    let bad: Vec<(u32, String)> = records
        .par_chunks(CHECK_BATCH)
        .enumerate()
        .flat_map_iter(|(n, batch)| reader.read_chunks(batch).into_iter().enumerate().filter_map(move |(k, r)| r.err().map(|e| ((n * CHECK_BATCH + k) as u32, e.to_string()))))
        .collect();
    report.chunks_checked = b.chunk_count() as u64;
    if !bad.is_empty() {
        // Name the files behind each bad chunk.
        let mut users: HashMap<u32, Vec<String>> = HashMap::new();
        b.walk(|path, ino, inode| -> Result<()> {
            if inode.kind() == Some(InodeKind::RegularFile) {
                for c in b.file_chunks(ino)? {
                    if bad.iter().any(|(i, _)| *i == c.chunk_index) {
                        users.entry(c.chunk_index).or_default().push(format!("{} at offset {}", String::from_utf8_lossy(path), c.file_offset));
                    }
                }
            }
            Ok(())
        })?;
        for (i, err) in &bad {
            let files = users.get(i).map(|u| u.join(", ")).unwrap_or_else(|| "no file".into());
            report.problems.push(format!("bad chunk {i}: {err}; used by {files}"));
        }
    }
    for (i, digest) in image.blob_digests.iter().enumerate() {
        let size = b.blob(i as u32)?.size;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        let mut failed = None;
        while offset < size {
            let len = (size - offset).min(8 << 20);
            match image.store.read_range(digest, offset, len) {
                Ok(data) => hasher.update(&data),
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
            offset += len;
        }
        report.blobs_checked += 1;
        if let Some(e) = failed {
            report.problems.push(format!("blob {digest}: {e}"));
        } else if hex::encode(hasher.finalize()) != digest.hex() {
            report.problems.push(format!("blob {digest}: content does not match its digest"));
        }
    }
    Ok(report)
}
