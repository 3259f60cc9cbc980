//! [`Bootstrap`]: a validated, random-access view of a bootstrap file.
//!
//! Opening checks the header, the checksum over the whole file and the bounds
//! of every table; after that, each accessor reads only the records it needs
//! (an inode is one 48-byte record, a lookup is a binary search over one
//! directory's entries), so a daemon answers the kernel without decoding the
//! whole file. [`Bootstrap::validate`] walks everything once more for
//! semantic consistency (sorted names, chunk lists that add up, reachable
//! inodes); readers call it once at open time and then rely on it.

use crate::error::{FormatError, Result};
use crate::records::*;
use std::sync::Arc;

/// Magic bytes at offset 0 of every bootstrap.
pub const MAGIC: [u8; 8] = *b"NAIADBS\0";
pub const VERSION_MAJOR: u16 = 2;
pub const VERSION_MINOR: u16 = 0;
/// Size of the fixed header.
pub const HEADER_SIZE: usize = 256;
/// Where the checksum lives inside the header.
pub(crate) const CHECKSUM_RANGE: std::ops::Range<usize> = 24..56;
/// Largest chunk a reader accepts (uncompressed or stored).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Longest file name accepted (Linux NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Deepest directory nesting accepted (a Linux path of PATH_MAX bytes has
/// at most 2048 components).
pub const MAX_DEPTH: usize = 4096;
/// Symlinks [`Bootstrap::resolve_path_following`] follows in one path at
/// most (Linux's limit).
pub const MAX_SYMLINK_HOPS: usize = 40;

/// The tables of a bootstrap, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    Inodes = 0,
    Dirents,
    FileChunks,
    Chunks,
    Blobs,
    Xattrs,
    Strings,
    Prefetch,
}

pub(crate) const TABLES: [(Table, &str, usize); 8] = [
    (Table::Inodes, "inode", InodeRecord::SIZE),
    (Table::Dirents, "dirent", DirentRecord::SIZE),
    (Table::FileChunks, "file-chunk", FileChunkRecord::SIZE),
    (Table::Chunks, "chunk", ChunkRecord::SIZE),
    (Table::Blobs, "blob", BlobRecord::SIZE),
    (Table::Xattrs, "xattr", XattrRecord::SIZE),
    (Table::Strings, "string", 1),
    (Table::Prefetch, "prefetch", 4),
];

#[derive(Debug, Clone, Copy, Default)]
struct Section {
    offset: usize,
    len: usize,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub name: &'a [u8],
    pub ino: u32,
}

/// One piece of a regular file: its bytes `[file_offset, file_offset + len)`
/// are those of `chunk` from `chunk_offset` on. The accessors that return
/// one have checked that the piece lies inside its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileChunk {
    pub file_offset: u64,
    pub chunk_index: u32,
    pub chunk_offset: u32,
    pub len: u32,
    pub chunk: ChunkRecord,
}

impl FileChunk {
    /// Where the piece ends in the file.
    pub fn file_end(&self) -> u64 {
        self.file_offset + self.len as u64
    }

    /// Whether the piece is its whole chunk (a large file's chunk, not a
    /// small file's share of a chunk group).
    pub fn is_whole_chunk(&self) -> bool {
        self.chunk_offset == 0 && self.len == self.chunk.uncompressed_size
    }

    /// The piece's bytes out of its chunk's decoded bytes; `None` when
    /// `chunk_data` is shorter than the chunk (not its decoded bytes).
    pub fn slice<'a>(&self, chunk_data: &'a [u8]) -> Option<&'a [u8]> {
        chunk_data.get(self.chunk_offset as usize..self.chunk_offset as usize + self.len as usize)
    }
}

/// The bytes of a bootstrap: owned, or anything else that holds them for
/// as long as the bootstrap lives (a reader's read-only file mapping).
pub type BootstrapBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A bootstrap file held in memory, with its header and table bounds checked.
#[derive(Clone)]
pub struct Bootstrap {
    data: BootstrapBytes,
    sections: [Section; 8],
    chunking: Option<ChunkingParams>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap").field("len", &self.as_bytes().len()).field("sections", &self.sections).field("chunking", &self.chunking).finish()
    }
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// blake3 over the file with the checksum field taken as zeros.
pub(crate) fn checksum(data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&data[..CHECKSUM_RANGE.start]);
    h.update(&[0u8; 32]);
    h.update(&data[CHECKSUM_RANGE.end..]);
    *h.finalize().as_bytes()
}

impl Bootstrap {
    /// Checks header, checksum and table bounds of `data`.
    pub fn from_bytes(data: Vec<u8>) -> Result<Self> {
        Self::from_shared(Arc::new(data), true)
    }

    /// [`Bootstrap::from_bytes`] over bytes held elsewhere. Without
    /// `verify_checksum` the checksum is not computed: for bytes this
    /// reader checked and validated before and kept unchanged (a cache of
    /// its own); header and table bounds are checked all the same, so no
    /// access can go out of bounds whatever the bytes are.
    pub fn from_shared(bytes: BootstrapBytes, verify_checksum: bool) -> Result<Self> {
        let data: &[u8] = (*bytes).as_ref();
        if data.len() < HEADER_SIZE {
            if data.len() < 8 || data[..8] != MAGIC {
                return Err(FormatError::BadMagic);
            }
            return Err(FormatError::Truncated { expected: HEADER_SIZE as u64, actual: data.len() as u64 });
        }
        if data[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let (major, minor) = (read_u16(data, 8), read_u16(data, 10));
        if major != VERSION_MAJOR {
            return Err(FormatError::UnsupportedVersion { major, minor, supported: VERSION_MAJOR });
        }
        let total = read_u64(data, 16);
        if total != data.len() as u64 {
            return Err(FormatError::Truncated { expected: total, actual: data.len() as u64 });
        }
        if verify_checksum && data[CHECKSUM_RANGE] != checksum(data) {
            return Err(FormatError::ChecksumMismatch);
        }
        let mut sections = [Section::default(); 8];
        let mut prev_end = HEADER_SIZE as u64;
        for (i, (_, name, rec)) in TABLES.iter().enumerate() {
            let off = read_u64(data, 56 + i * 16);
            let len = read_u64(data, 64 + i * 16);
            let bad = |detail: String| FormatError::BadTable { table: name, detail };
            if off < prev_end || !off.is_multiple_of(8) {
                return Err(bad(format!("offset {off} overlaps the previous table or is unaligned")));
            }
            let end = off.checked_add(len).ok_or_else(|| bad("length overflows".into()))?;
            if end > total {
                return Err(bad(format!("ends at {end}, past the end of the file ({total})")));
            }
            if !len.is_multiple_of(*rec as u64) {
                return Err(bad(format!("length {len} is not a multiple of the record size {rec}")));
            }
            sections[i] = Section { offset: off as usize, len: len as usize };
            prev_end = end;
        }
        if sections[Table::Inodes as usize].len / InodeRecord::SIZE > u32::MAX as usize - 1 {
            return Err(FormatError::TooLarge("more than 2^32-2 inodes".into()));
        }
        if sections[Table::Strings as usize].len > u32::MAX as usize {
            return Err(FormatError::TooLarge("a string table of 4 GiB or more".into()));
        }
        if sections[Table::Blobs as usize].len / BlobRecord::SIZE > MAX_BLOBS as usize {
            return Err(FormatError::TooLarge(format!("more than {MAX_BLOBS} blobs")));
        }
        let chunking = match read_u32(data, 184) {
            0 => None,
            1 => Some(ChunkingParams::Fixed { size: read_u32(data, 196) }),
            2 => Some(ChunkingParams::ContentDefined { min: read_u32(data, 188), avg: read_u32(data, 192), max: read_u32(data, 196) }),
            m => return Err(FormatError::BadHeader(format!("unknown chunking mode {m}"))),
        };
        match chunking {
            Some(ChunkingParams::Fixed { size }) if !size.is_power_of_two() || size > MAX_CHUNK_SIZE => {
                return Err(FormatError::BadHeader(format!("fixed chunk size {size} is not a power of two up to {MAX_CHUNK_SIZE}")));
            }
            Some(ChunkingParams::ContentDefined { min, avg, max }) if !(0 < min && min <= avg && avg <= max && max <= MAX_CHUNK_SIZE) => {
                return Err(FormatError::BadHeader(format!("chunk sizes min={min} avg={avg} max={max} are inconsistent")));
            }
            _ => {}
        }
        let b = Bootstrap { data: bytes.clone(), sections, chunking };
        let root = b.inode(ROOT_INO)?;
        if root.kind() != Some(InodeKind::Directory) {
            return Err(FormatError::BadInode { ino: ROOT_INO, detail: "root is not a directory".into() });
        }
        Ok(b)
    }

    /// The raw bytes of the file.
    pub fn as_bytes(&self) -> &[u8] {
        (*self.data).as_ref()
    }

    /// The chunking parameters recorded by the converter, if any.
    pub fn chunking(&self) -> Option<ChunkingParams> {
        self.chunking
    }

    fn table(&self, t: Table) -> &[u8] {
        let s = self.sections[t as usize];
        &self.as_bytes()[s.offset..s.offset + s.len]
    }

    fn count(&self, t: Table) -> u64 {
        let (_, _, size) = TABLES[t as usize];
        (self.sections[t as usize].len / size) as u64
    }

    fn record(&self, t: Table, index: u64) -> Result<&[u8]> {
        let (_, name, size) = TABLES[t as usize];
        let len = self.count(t);
        if index >= len {
            return Err(FormatError::OutOfRange { table: name, index, len });
        }
        let at = index as usize * size;
        Ok(&self.table(t)[at..at + size])
    }

    pub fn inode_count(&self) -> u32 {
        self.count(Table::Inodes) as u32
    }
    pub fn dirent_count(&self) -> u64 {
        self.count(Table::Dirents)
    }
    pub fn file_chunk_count(&self) -> u64 {
        self.count(Table::FileChunks)
    }
    pub fn chunk_count(&self) -> u32 {
        self.count(Table::Chunks) as u32
    }
    pub fn blob_count(&self) -> u32 {
        self.count(Table::Blobs) as u32
    }
    pub fn xattr_count(&self) -> u64 {
        self.count(Table::Xattrs)
    }
    pub fn string_table_len(&self) -> u64 {
        self.sections[Table::Strings as usize].len as u64
    }

    /// Inode `ino` (1-based; [`ROOT_INO`] is the root).
    pub fn inode(&self, ino: u32) -> Result<InodeRecord> {
        if ino == 0 {
            return Err(FormatError::OutOfRange { table: "inode", index: 0, len: self.count(Table::Inodes) });
        }
        Ok(InodeRecord::decode(self.record(Table::Inodes, ino as u64 - 1)?))
    }

    pub fn chunk(&self, index: u32) -> Result<ChunkRecord> {
        Ok(ChunkRecord::decode(self.record(Table::Chunks, index as u64)?))
    }

    pub fn blob(&self, index: u32) -> Result<BlobRecord> {
        Ok(BlobRecord::decode(self.record(Table::Blobs, index as u64)?))
    }

    /// All blobs, in blob-index order.
    pub fn blobs(&self) -> Result<Vec<BlobRecord>> {
        (0..self.blob_count()).map(|i| self.blob(i)).collect()
    }

    /// The prefetch table: chunk indexes in the order they should be fetched.
    pub fn prefetch(&self) -> Result<Vec<u32>> {
        let t = self.table(Table::Prefetch);
        let list: Vec<u32> = t.chunks_exact(4).map(|c| read_u32(c, 0)).collect();
        let n = self.chunk_count();
        for &i in &list {
            if i >= n {
                return Err(FormatError::OutOfRange { table: "chunk", index: i as u64, len: n as u64 });
            }
        }
        Ok(list)
    }

    /// `len` bytes of the string table from `offset`.
    pub fn string(&self, offset: u64, len: u64) -> Result<&[u8]> {
        let t = self.table(Table::Strings);
        let bad = || FormatError::BadString { offset, len, table_len: t.len() as u64 };
        let end = offset.checked_add(len).ok_or_else(bad)?;
        if end > t.len() as u64 {
            return Err(bad());
        }
        Ok(&t[offset as usize..end as usize])
    }

    fn dirent(&self, index: u64) -> Result<DirEntry<'_>> {
        let d = DirentRecord::decode(self.record(Table::Dirents, index)?);
        Ok(DirEntry { name: self.string(d.name_offset as u64, d.name_len as u64)?, ino: d.ino })
    }

    fn expect_kind(&self, ino: u32, inode: &InodeRecord, kind: InodeKind) -> Result<()> {
        if inode.kind() != Some(kind) {
            return Err(FormatError::BadInode { ino, detail: format!("is not a {kind:?}") });
        }
        Ok(())
    }

    /// The entry of directory `dir` at position `pos`, or `None` past the end.
    pub fn dir_entry(&self, dir: u32, pos: u64) -> Result<Option<DirEntry<'_>>> {
        let inode = self.inode(dir)?;
        self.expect_kind(dir, &inode, InodeKind::Directory)?;
        if pos >= inode.data_count as u64 {
            return Ok(None);
        }
        self.dirent(inode.data_first as u64 + pos).map(Some)
    }

    /// All entries of directory `dir`, sorted by name.
    pub fn dir_entries(&self, dir: u32) -> Result<Vec<DirEntry<'_>>> {
        let inode = self.inode(dir)?;
        self.expect_kind(dir, &inode, InodeKind::Directory)?;
        (0..inode.data_count as u64).map(|i| self.dirent(inode.data_first as u64 + i)).collect()
    }

    /// The inode named `name` in directory `dir` (binary search).
    pub fn lookup(&self, dir: u32, name: &[u8]) -> Result<Option<u32>> {
        let inode = self.inode(dir)?;
        self.expect_kind(dir, &inode, InodeKind::Directory)?;
        let (mut lo, mut hi) = (0u64, inode.data_count as u64);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.dirent(inode.data_first as u64 + mid)?;
            match e.name.cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(e.ino)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Resolves a `/`-separated path from the root, without following
    /// symlinks ([`Bootstrap::resolve_path_following`] follows them).
    pub fn resolve_path(&self, path: &[u8]) -> Result<Option<u32>> {
        let mut ino = ROOT_INO;
        for part in path.split(|&c| c == b'/').filter(|p| !p.is_empty() && *p != b".") {
            match self.inode(ino)?.kind() {
                Some(InodeKind::Directory) => {}
                _ => return Ok(None),
            }
            match self.lookup(ino, part)? {
                Some(i) => ino = i,
                None => return Ok(None),
            }
        }
        Ok(Some(ino))
    }

    /// Resolves a `/`-separated path from the root as the kernel would in
    /// a chroot: symlinks followed in every component, the last included
    /// (an absolute target from the root, at most [`MAX_SYMLINK_HOPS`]),
    /// `..` of the root is the root. `None` if a component is missing or
    /// not a directory, or the hops run out.
    pub fn resolve_path_following(&self, path: &[u8]) -> Result<Option<u32>> {
        let components = |p: &[u8]| p.split(|&c| c == b'/').filter(|c| !c.is_empty()).rev().map(<[u8]>::to_vec).collect::<Vec<_>>();
        // Components still to walk, the next last; the directories walked,
        // the root first (never empty: the root is not popped), the one
        // reached last.
        let mut parts = components(path);
        let mut dirs: Vec<u32> = vec![ROOT_INO];
        let mut hops = 0;
        while let Some(part) = parts.pop() {
            let dir = dirs.last().copied().unwrap_or(ROOT_INO);
            match part.as_slice() {
                b"." => continue,
                b".." => {
                    if dirs.len() > 1 {
                        dirs.pop();
                    }
                    continue;
                }
                _ => {}
            }
            if self.inode(dir)?.kind() != Some(InodeKind::Directory) {
                return Ok(None);
            }
            let Some(ino) = self.lookup(dir, &part)? else { return Ok(None) };
            match self.inode(ino)?.kind() {
                Some(InodeKind::Symlink) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Ok(None);
                    }
                    let target = self.symlink_target(ino)?;
                    if target.starts_with(b"/") {
                        dirs.truncate(1);
                    }
                    parts.extend(components(target));
                }
                Some(InodeKind::Directory) => dirs.push(ino),
                _ if parts.is_empty() => return Ok(Some(ino)),
                _ => return Ok(None),
            }
        }
        Ok(dirs.last().copied())
    }

    /// The target of symlink `ino`.
    pub fn symlink_target(&self, ino: u32) -> Result<&[u8]> {
        let inode = self.inode(ino)?;
        self.expect_kind(ino, &inode, InodeKind::Symlink)?;
        self.string(inode.data_first as u64, inode.data_count as u64)
    }

    /// The extended attributes of `ino`, as (name, value) pairs.
    /// The table is sorted by inode: a binary search finds the first.
    pub fn xattrs(&self, ino: u32) -> Result<Vec<(&[u8], &[u8])>> {
        self.inode(ino)?;
        let (mut lo, mut hi) = (0u64, self.xattr_count());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if XattrRecord::decode(self.record(Table::Xattrs, mid)?).ino < ino {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut out = Vec::new();
        for i in lo..self.xattr_count() {
            let x = XattrRecord::decode(self.record(Table::Xattrs, i)?);
            if x.ino != ino {
                break;
            }
            out.push((self.string(x.name_offset as u64, x.name_len as u64)?, self.string(x.value_offset as u64, x.value_len as u64)?));
        }
        Ok(out)
    }

    /// The name of every xattr record in the image (one per inode that
    /// has it), in table order.
    pub fn xattr_names(&self) -> Result<Vec<&[u8]>> {
        (0..self.xattr_count())
            .map(|i| {
                let x = XattrRecord::decode(self.record(Table::Xattrs, i)?);
                self.string(x.name_offset as u64, x.name_len as u64)
            })
            .collect()
    }

    /// Number of chunks of regular file `ino`.
    pub fn file_chunk_len(&self, ino: u32) -> Result<u32> {
        let inode = self.inode(ino)?;
        self.expect_kind(ino, &inode, InodeKind::RegularFile)?;
        Ok(inode.data_count)
    }

    /// Chunk `pos` of regular file `ino`.
    pub fn file_chunk(&self, ino: u32, pos: u32) -> Result<FileChunk> {
        let inode = self.inode(ino)?;
        self.expect_kind(ino, &inode, InodeKind::RegularFile)?;
        if pos >= inode.data_count {
            return Err(FormatError::OutOfRange { table: "file-chunk", index: pos as u64, len: inode.data_count as u64 });
        }
        let first = inode.data_first as u64;
        let r = FileChunkRecord::decode(self.record(Table::FileChunks, first + pos as u64)?);
        let end = if pos + 1 < inode.data_count { FileChunkRecord::decode(self.record(Table::FileChunks, first + pos as u64 + 1)?).file_offset } else { inode.size };
        let chunk = self.chunk(r.chunk_index)?;
        let bad = |detail: String| FormatError::BadInode { ino, detail };
        let len =
            end.checked_sub(r.file_offset).filter(|&l| l > 0).ok_or_else(|| bad(format!("chunk piece {pos} at offset {} is empty or ends before it starts", r.file_offset)))?;
        if r.chunk_offset as u64 + len > chunk.uncompressed_size as u64 {
            return Err(bad(format!("chunk piece {pos} ({len} bytes from {}) lies past the end of chunk {} ({} bytes)", r.chunk_offset, r.chunk_index, chunk.uncompressed_size)));
        }
        Ok(FileChunk { file_offset: r.file_offset, chunk_index: r.chunk_index, chunk_offset: r.chunk_offset, len: len as u32, chunk })
    }

    /// All chunks of regular file `ino`, in file order.
    pub fn file_chunks(&self, ino: u32) -> Result<Vec<FileChunk>> {
        (0..self.file_chunk_len(ino)?).map(|p| self.file_chunk(ino, p)).collect()
    }

    /// The chunks of regular file `ino` that overlap `[offset, offset+len)`.
    /// Finds the first one by binary search.
    pub fn file_chunks_in_range(&self, ino: u32, offset: u64, len: u64) -> Result<Vec<FileChunk>> {
        let n = self.file_chunk_len(ino)?;
        let end = offset.saturating_add(len);
        let (mut lo, mut hi) = (0u32, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let c = self.file_chunk(ino, mid)?;
            if c.file_end() <= offset {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut out = Vec::new();
        for p in lo..n {
            let c = self.file_chunk(ino, p)?;
            if c.file_offset >= end {
                break;
            }
            out.push(c);
        }
        Ok(out)
    }

    /// Visits every path depth-first in name order, parents before their
    /// children, starting with the root as `/`. `visit` gets the absolute
    /// path, the inode number and its record. A hardlinked inode is visited
    /// once per name.
    pub fn walk<E: From<FormatError>>(&self, mut visit: impl FnMut(&[u8], u32, &InodeRecord) -> std::result::Result<(), E>) -> std::result::Result<(), E> {
        let root = self.inode(ROOT_INO)?;
        visit(b"/", ROOT_INO, &root)?;
        // One path buffer for the whole walk: a frame remembers how long
        // its directory's path is, and everything after that is its
        // descendants' (so memory is one path, not one per level).
        // (directory inode, length of its path in `path`, next entry position)
        let mut path: Vec<u8> = Vec::new();
        let mut stack: Vec<(u32, usize, u64)> = vec![(ROOT_INO, 0, 0)];
        while let Some((dir, len, pos)) = stack.pop() {
            let Some(entry) = self.dir_entry(dir, pos)? else { continue };
            stack.push((dir, len, pos + 1));
            path.truncate(len);
            path.push(b'/');
            path.extend_from_slice(entry.name);
            let inode = self.inode(entry.ino)?;
            visit(&path, entry.ino, &inode)?;
            if inode.kind() == Some(InodeKind::Directory) {
                if stack.len() > MAX_DEPTH + 1 {
                    return Err(FormatError::BadInode { ino: entry.ino, detail: format!("directory nested deeper than {MAX_DEPTH} levels") }.into());
                }
                stack.push((entry.ino, path.len(), 0));
            }
        }
        Ok(())
    }

    /// Checks everything the accessors above do not: that every record makes
    /// sense and the records agree with each other. Readers call this once
    /// when they open a bootstrap.
    pub fn validate(&self) -> Result<()> {
        let n_inodes = self.inode_count();
        let n_chunks = self.chunk_count();
        let n_blobs = self.blob_count();
        for i in 0..n_blobs {
            let _ = self.blob(i)?;
        }
        for c in 0..n_chunks {
            let rec = self.chunk(c)?;
            // The digest is spelled out only for an error.
            let bad = |detail: String| FormatError::BadChunk { digest: hex(&rec.digest), detail };
            let blob = self.blob(rec.blob_index).map_err(|e| bad(e.to_string()))?;
            if rec.uncompressed_size == 0 || rec.uncompressed_size > MAX_CHUNK_SIZE {
                return Err(bad(format!("uncompressed size {} out of bounds", rec.uncompressed_size)));
            }
            if rec.compressed_size == 0 || rec.compressed_size > rec.uncompressed_size {
                return Err(bad(format!("stored size {} is 0 or more than the uncompressed size {}", rec.compressed_size, rec.uncompressed_size)));
            }
            let end = rec.compressed_offset.checked_add(rec.compressed_size as u64);
            if end.is_none_or(|e| e > blob.size) {
                return Err(bad(format!("lies past the end of blob {} ({} bytes)", rec.blob_index, blob.size)));
            }
        }
        self.prefetch()?;
        self.check_ranges_disjoint()?;
        let mut prev_ino = 0;
        for i in 0..self.xattr_count() {
            let x = XattrRecord::decode(self.record(Table::Xattrs, i)?);
            if x.ino < prev_ino || x.ino == 0 || x.ino > n_inodes {
                return Err(FormatError::BadTable {
                    table: "xattr",
                    detail: format!("record {i} names inode {} (the table must be sorted by inode, within 1..={n_inodes})", x.ino),
                });
            }
            prev_ino = x.ino;
            self.string(x.name_offset as u64, x.name_len as u64)?;
            self.string(x.value_offset as u64, x.value_len as u64)?;
        }

        // Walk the tree from the root: every inode must be reached, every
        // directory exactly once, and every link count must match.
        let mut refs = vec![0u32; n_inodes as usize + 1];
        let mut subdirs = vec![0u32; n_inodes as usize + 1];
        let mut seen_dir = vec![false; n_inodes as usize + 1];
        let mut stack = vec![(ROOT_INO, 0usize)];
        seen_dir[ROOT_INO as usize] = true;
        while let Some((dir, depth)) = stack.pop() {
            if depth > MAX_DEPTH {
                return Err(FormatError::BadInode { ino: dir, detail: format!("directory nested deeper than {MAX_DEPTH} levels") });
            }
            let inode = self.inode(dir)?;
            let bad = |detail: String| FormatError::BadInode { ino: dir, detail };
            let end = inode.data_first as u64 + inode.data_count as u64;
            if end > self.dirent_count() {
                return Err(bad("directory entries lie outside the dirent table".into()));
            }
            let mut prev: Option<&[u8]> = None;
            for e in self.dir_entries(dir)? {
                if e.name.is_empty() || e.name.len() > MAX_NAME_LEN || e.name == b"." || e.name == b".." || e.name.contains(&b'/') || e.name.contains(&0) {
                    return Err(bad(format!("invalid entry name {:?}", String::from_utf8_lossy(e.name))));
                }
                if prev.is_some_and(|p| p >= e.name) {
                    return Err(bad("directory entries are not sorted or not unique".into()));
                }
                prev = Some(e.name);
                if e.ino == 0 || e.ino > n_inodes || e.ino == ROOT_INO {
                    return Err(bad(format!("entry {:?} names invalid inode {}", String::from_utf8_lossy(e.name), e.ino)));
                }
                let child = self.inode(e.ino)?;
                if child.kind() == Some(InodeKind::Directory) {
                    if seen_dir[e.ino as usize] {
                        return Err(bad(format!("directory inode {} is linked twice", e.ino)));
                    }
                    seen_dir[e.ino as usize] = true;
                    subdirs[dir as usize] += 1;
                    if child.parent != dir {
                        return Err(FormatError::BadInode { ino: e.ino, detail: format!("parent is {} but it is listed in {}", child.parent, dir) });
                    }
                    stack.push((e.ino, depth + 1));
                }
                refs[e.ino as usize] += 1;
            }
        }
        for ino in 1..=n_inodes {
            let inode = self.inode(ino)?;
            let bad = |detail: String| FormatError::BadInode { ino, detail };
            let kind = inode.kind().ok_or_else(|| bad(format!("unknown file type in mode {:o}", inode.mode)))?;
            if inode.mtime_nsec >= 1_000_000_000 {
                return Err(bad(format!("mtime nanoseconds {} out of range", inode.mtime_nsec)));
            }
            if inode.parent == 0 || inode.parent > n_inodes {
                return Err(bad(format!("parent {} out of range", inode.parent)));
            }
            let expected_nlink = match kind {
                InodeKind::Directory => {
                    if !seen_dir[ino as usize] {
                        return Err(bad("directory not reachable from the root".into()));
                    }
                    2 + subdirs[ino as usize]
                }
                _ => {
                    if refs[ino as usize] == 0 {
                        return Err(bad("not reachable from the root".into()));
                    }
                    refs[ino as usize]
                }
            };
            if inode.nlink != expected_nlink {
                return Err(bad(format!("nlink is {} but {} entries name it", inode.nlink, expected_nlink)));
            }
            match kind {
                InodeKind::RegularFile => {
                    if inode.data_first as u64 + inode.data_count as u64 > self.file_chunk_count() {
                        return Err(bad("chunk list lies outside the file-chunk table".into()));
                    }
                    // Each piece ends where the next starts (file_chunk checks
                    // it is not empty and lies in its chunk), so the pieces
                    // cover [0, size) when the first starts at 0.
                    let mut next = 0u64;
                    for c in self.file_chunks(ino)? {
                        if c.file_offset != next {
                            return Err(bad(format!("chunk list has a gap or overlap at offset {}", c.file_offset)));
                        }
                        next = c.file_end();
                    }
                    if next != inode.size {
                        return Err(bad(format!("chunks cover {} bytes but the size is {}", next, inode.size)));
                    }
                }
                InodeKind::Symlink => {
                    let target = self.symlink_target(ino)?;
                    if target.is_empty() || inode.size != target.len() as u64 {
                        return Err(bad("symlink target is empty or its length disagrees with the size".into()));
                    }
                }
                InodeKind::Directory | InodeKind::CharDevice | InodeKind::BlockDevice => {}
                InodeKind::Fifo | InodeKind::Socket => {
                    if inode.data_count != 0 || inode.size != 0 {
                        return Err(bad("special file with data".into()));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Bootstrap {
    /// The dirent ranges of directories and the file-chunk ranges of
    /// regular files must not overlap within their table (SPEC 2.x): each
    /// record belongs to one inode. That keeps
    /// validation linear: walking every inode's range then reads each
    /// record once, however the ranges are crafted.
    fn check_ranges_disjoint(&self) -> Result<()> {
        let mut dirents = Vec::new();
        let mut file_chunks = Vec::new();
        for ino in 1..=self.inode_count() {
            let inode = self.inode(ino)?;
            match inode.kind() {
                Some(InodeKind::Directory) => dirents.push((inode.data_first as u64, inode.data_count as u64, ino)),
                Some(InodeKind::RegularFile) => file_chunks.push((inode.data_first as u64, inode.data_count as u64, ino)),
                _ => {}
            }
        }
        for (table, mut ranges) in [("dirent", dirents), ("file-chunk", file_chunks)] {
            ranges.retain(|r| r.1 > 0);
            ranges.sort_unstable();
            for pair in ranges.windows(2) {
                let ((a_first, a_count, a_ino), (b_first, _, b_ino)) = (pair[0], pair[1]);
                if a_first.saturating_add(a_count) > b_first {
                    return Err(FormatError::BadInode { ino: b_ino, detail: format!("its {table} range overlaps that of inode {a_ino}") });
                }
            }
        }
        Ok(())
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
