//! [`BootstrapBuilder`]: collects records and writes a bootstrap file.
//!
//! The caller (the converter) decides inode numbers and fills in records;
//! the builder interns strings, lays the tables out as SPEC.md says, writes
//! the header and checksum, and refuses to produce a file that
//! [`Bootstrap::validate`] would reject.

use std::collections::HashMap;

use crate::bootstrap::{checksum, Bootstrap, CHECKSUM_RANGE, HEADER_SIZE, MAGIC, TABLES, VERSION_MAJOR, VERSION_MINOR};
use crate::error::Result;
use crate::records::*;

/// Records of a bootstrap under construction.
#[derive(Debug, Default)]
pub struct BootstrapBuilder {
    /// Inode `n` is `inodes[n - 1]`; inode 1 is the root directory.
    pub inodes: Vec<InodeRecord>,
    pub dirents: Vec<DirentRecord>,
    pub file_chunks: Vec<FileChunkRecord>,
    pub chunks: Vec<ChunkRecord>,
    pub blobs: Vec<BlobRecord>,
    pub xattrs: Vec<XattrRecord>,
    /// Chunk indexes to fetch first, in order.
    pub prefetch: Vec<u32>,
    pub chunking: Option<ChunkingParams>,
    strings: Vec<u8>,
    interned: HashMap<Vec<u8>, u32>,
}

impl BootstrapBuilder {
    pub fn new(chunking: Option<ChunkingParams>) -> Self {
        BootstrapBuilder { chunking, ..Default::default() }
    }

    /// Stores `s` in the string table once and returns its offset. Offsets
    /// are 32 bits: [`BootstrapBuilder::finish`] refuses a table that grew
    /// to 4 GiB.
    pub fn intern(&mut self, s: &[u8]) -> u32 {
        if let Some(&off) = self.interned.get(s) {
            return off;
        }
        let off = self.strings.len().min(u32::MAX as usize) as u32;
        self.strings.extend_from_slice(s);
        self.interned.insert(s.to_vec(), off);
        off
    }

    /// Adds an xattr record `name`=`value` of inode `ino`. Inodes must come
    /// in ascending order (the table is sorted by inode).
    pub fn push_xattr(&mut self, ino: u32, name: &[u8], value: &[u8]) {
        let name_offset = self.intern(name);
        let value_offset = self.intern(value);
        self.xattrs.push(XattrRecord { ino, name_offset, value_offset, name_len: name.len() as u32, value_len: value.len() as u32 });
    }

    /// Adds a directory entry record and returns its index.
    pub fn push_dirent(&mut self, name: &[u8], ino: u32) -> u32 {
        let name_offset = self.intern(name);
        self.dirents.push(DirentRecord { name_offset, ino, name_len: name.len().min(u16::MAX as usize) as u16 });
        (self.dirents.len() - 1) as u32
    }

    /// Writes the bootstrap file and checks it decodes and validates.
    pub fn finish(&self) -> Result<Vec<u8>> {
        self.check_limits()?;
        let out = self.encode();
        Bootstrap::from_bytes(out.clone())?.validate()?;
        Ok(out)
    }

    /// What the record widths cannot hold (SPEC 2.x): refused here rather
    /// than truncated by the encoding.
    fn check_limits(&self) -> Result<()> {
        let too_large = |what: String| Err(crate::FormatError::TooLarge(what));
        if self.strings.len() > u32::MAX as usize {
            return too_large("a string table of 4 GiB or more".into());
        }
        if self.dirents.len() > u32::MAX as usize || self.file_chunks.len() > u32::MAX as usize {
            return too_large("more than 2^32 directory entries or chunk pieces".into());
        }
        if self.blobs.len() > MAX_BLOBS as usize {
            return too_large(format!("more than {MAX_BLOBS} blobs"));
        }
        if let Some(c) = self.chunks.iter().find(|c| c.compressed_offset > MAX_BLOB_OFFSET) {
            return too_large(format!("a chunk at blob offset {} (past 2^48)", c.compressed_offset));
        }
        Ok(())
    }

    /// Writes the bootstrap file as the records say, valid or not (sealed
    /// with a correct checksum): for tests that hand readers hostile input.
    /// Writers use [`BootstrapBuilder::finish`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_SIZE];
        let mut bounds = Vec::with_capacity(TABLES.len());
        let mut prefetch = Vec::with_capacity(self.prefetch.len() * 4);
        for p in &self.prefetch {
            prefetch.extend_from_slice(&p.to_le_bytes());
        }
        for (i, _) in TABLES.iter().enumerate() {
            while !out.len().is_multiple_of(8) {
                out.push(0);
            }
            let start = out.len();
            match i {
                0 => self.inodes.iter().for_each(|r| r.encode(&mut out)),
                1 => self.dirents.iter().for_each(|r| r.encode(&mut out)),
                2 => self.file_chunks.iter().for_each(|r| r.encode(&mut out)),
                3 => self.chunks.iter().for_each(|r| r.encode(&mut out)),
                4 => self.blobs.iter().for_each(|r| r.encode(&mut out)),
                5 => self.xattrs.iter().for_each(|r| r.encode(&mut out)),
                6 => out.extend_from_slice(&self.strings),
                _ => out.extend_from_slice(&prefetch),
            }
            bounds.push((start as u64, (out.len() - start) as u64));
        }
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
        out[10..12].copy_from_slice(&VERSION_MINOR.to_le_bytes());
        let total = out.len() as u64;
        out[16..24].copy_from_slice(&total.to_le_bytes());
        for (i, (off, len)) in bounds.iter().enumerate() {
            out[56 + i * 16..64 + i * 16].copy_from_slice(&off.to_le_bytes());
            out[64 + i * 16..72 + i * 16].copy_from_slice(&len.to_le_bytes());
        }
        let (mode, min, avg, max) = match self.chunking {
            None => (0u32, 0, 0, 0),
            Some(ChunkingParams::Fixed { size }) => (1, size, size, size),
            Some(ChunkingParams::ContentDefined { min, avg, max }) => (2, min, avg, max),
        };
        for (at, v) in [(184, mode), (188, min), (192, avg), (196, max)] {
            out[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        let sum = checksum(&out);
        out[CHECKSUM_RANGE].copy_from_slice(&sum);
        out
    }
}
