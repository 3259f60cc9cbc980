//! `naiad inspect`: a summary of a naiad image from its bootstrap alone.

use naiad_format::{Bootstrap, InodeKind};
use naiad_reader::NaiadImage;
use serde::Serialize;

use crate::error::{ConvertError, Result};

#[derive(Debug, Default, Serialize)]
pub struct ImageStats {
    pub reference: String,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Names beyond the first of hardlinked inodes.
    pub hardlinks: u64,
    pub special_files: u64,
    pub inodes: u64,
    /// Sum of the sizes of distinct regular files.
    pub total_file_bytes: u64,
    /// Entries in all files' chunk lists.
    pub chunks: u64,
    pub unique_chunks: u64,
    /// Uncompressed bytes of the unique chunks.
    pub unique_chunk_bytes: u64,
    /// Stored bytes of the unique chunks.
    pub stored_chunk_bytes: u64,
    /// unique_chunk_bytes / stored_chunk_bytes.
    pub compression_ratio: f64,
    pub blobs: Vec<BlobStat>,
    pub bootstrap_bytes: u64,
    pub bootstrap_layer_bytes: u64,
    pub prefetch_chunks: u64,
    pub chunking: String,
}

#[derive(Debug, Serialize)]
pub struct BlobStat {
    pub digest: String,
    pub size: u64,
}

/// One entry of `naiad inspect --path`: `size` bytes of the file from
/// `file_offset` are those of a chunk of `chunk_size` bytes from
/// `chunk_offset` on (a whole chunk, or a share of a chunk group).
#[derive(Debug, Serialize)]
pub struct ChunkListing {
    pub file_offset: u64,
    pub size: u32,
    pub chunk_offset: u32,
    pub chunk_size: u32,
    pub blob_index: u32,
    pub blob_offset: u64,
    pub stored_size: u32,
    pub compressed: bool,
    pub digest: String,
}

pub fn inspect(image: &NaiadImage) -> Result<ImageStats> {
    let b = &image.bootstrap;
    let mut s = ImageStats { reference: image.reference.to_string(), ..Default::default() };
    for ino in 1..=b.inode_count() {
        let inode = b.inode(ino)?;
        match inode.kind() {
            Some(InodeKind::Directory) => s.directories += 1,
            Some(InodeKind::RegularFile) => {
                s.files += 1;
                s.total_file_bytes += inode.size;
                s.chunks += inode.data_count as u64;
            }
            Some(InodeKind::Symlink) => s.symlinks += 1,
            _ => s.special_files += 1,
        }
        if inode.kind() != Some(InodeKind::Directory) {
            s.hardlinks += inode.nlink.saturating_sub(1) as u64;
        }
    }
    s.inodes = b.inode_count() as u64;
    s.unique_chunks = b.chunk_count() as u64;
    for i in 0..b.chunk_count() {
        let c = b.chunk(i)?;
        s.unique_chunk_bytes += c.uncompressed_size as u64;
        s.stored_chunk_bytes += c.compressed_size as u64;
    }
    s.compression_ratio = if s.stored_chunk_bytes == 0 { 1.0 } else { s.unique_chunk_bytes as f64 / s.stored_chunk_bytes as f64 };
    s.blobs = b.blobs()?.iter().map(|r| BlobStat { digest: r.digest_string(), size: r.size }).collect();
    s.bootstrap_bytes = b.as_bytes().len() as u64;
    s.bootstrap_layer_bytes = image.bootstrap_layer_size;
    s.prefetch_chunks = b.prefetch()?.len() as u64;
    s.chunking = match b.chunking() {
        Some(naiad_format::ChunkingParams::Fixed { size }) => format!("fixed {size}"),
        Some(naiad_format::ChunkingParams::ContentDefined { min, avg, max }) => format!("cdc min={min} avg={avg} max={max}"),
        None => "unknown".into(),
    };
    Ok(s)
}

/// The chunks of the regular file at `path`.
pub fn file_chunks(bootstrap: &Bootstrap, path: &str) -> Result<Vec<ChunkListing>> {
    let ino = bootstrap.resolve_path(path.as_bytes())?.ok_or_else(|| ConvertError::Invalid(format!("{path}: no such file in the image")))?;
    if bootstrap.inode(ino)?.kind() != Some(InodeKind::RegularFile) {
        return Err(ConvertError::Invalid(format!("{path}: not a regular file")));
    }
    Ok(bootstrap
        .file_chunks(ino)?
        .into_iter()
        .map(|c| ChunkListing {
            file_offset: c.file_offset,
            size: c.len,
            chunk_offset: c.chunk_offset,
            chunk_size: c.chunk.uncompressed_size,
            blob_index: c.chunk.blob_index,
            blob_offset: c.chunk.compressed_offset,
            stored_size: c.chunk.compressed_size,
            compressed: c.chunk.is_zstd(),
            digest: naiad_format::bootstrap::hex(&c.chunk.digest),
        })
        .collect())
}
