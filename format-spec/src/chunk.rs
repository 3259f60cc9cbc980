//! One chunk as stored in a blob: zstd-compressed, or raw when compression
//! does not make it smaller, and always verified against the blake3 digest
//! of its uncompressed bytes when read back.

use crate::bootstrap::hex;
use crate::error::{FormatError, Result};
use crate::records::{ChunkDigest, ChunkRecord};

/// A chunk ready to be appended to a blob.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    pub digest: ChunkDigest,
    pub uncompressed_size: u32,
    /// The bytes to store: a zstd frame (fewer bytes than the data), or the
    /// raw data.
    pub stored: Vec<u8>,
}

/// Hashes and compresses `data` at zstd `level`, keeping the raw bytes when
/// compression would not save anything.
pub fn encode_chunk(data: &[u8], level: i32) -> EncodedChunk {
    encode_hashed_chunk(data, *blake3::hash(data).as_bytes(), level)
}

/// [`encode_chunk`] for data whose blake3 `digest` the caller already has.
pub fn encode_hashed_chunk(data: &[u8], digest: ChunkDigest, level: i32) -> EncodedChunk {
    // One compression context per thread, not one per chunk.
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    }
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(level)?);
        }
        match c.as_mut() {
            Some(c) => {
                c.set_compression_level(level)?;
                c.compress(data)
            }
            None => Err(std::io::Error::other("no zstd compressor")),
        }
    });
    let stored = compressed.ok().filter(|c| c.len() < data.len()).unwrap_or_else(|| data.to_vec());
    EncodedChunk { digest, uncompressed_size: data.len() as u32, stored }
}

/// Decodes the stored bytes of `chunk` and checks size and digest.
pub fn decode_chunk(stored: &[u8], chunk: &ChunkRecord) -> Result<Vec<u8>> {
    let bad = |detail: String| FormatError::BadChunk { digest: hex(&chunk.digest), detail };
    if stored.len() != chunk.compressed_size as usize {
        return Err(bad(format!("read {} stored bytes, expected {}", stored.len(), chunk.compressed_size)));
    }
    let data = if chunk.is_zstd() {
        // One decompression context per thread, not one per chunk.
        thread_local! {
            static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
        }
        DECOMPRESSOR
            .with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new()?);
                }
                match d.as_mut() {
                    Some(d) => d.decompress(stored, chunk.uncompressed_size as usize),
                    None => Err(std::io::Error::other("no zstd decompressor")),
                }
            })
            .map_err(|e| bad(format!("zstd: {e}")))?
    } else {
        stored.to_vec()
    };
    if data.len() != chunk.uncompressed_size as usize {
        return Err(bad(format!("decoded to {} bytes, expected {}", data.len(), chunk.uncompressed_size)));
    }
    if blake3::hash(&data).as_bytes() != &chunk.digest {
        return Err(bad("digest mismatch: the stored chunk is corrupted".into()));
    }
    Ok(data)
}
