//! The fixed-size records of a bootstrap and their byte encodings.
//!
//! Every record is little-endian and has a fixed size, so record `i` of a
//! table lives at `table_offset + i * SIZE` and can be read without decoding
//! anything before it. `decode` functions take exactly `SIZE` bytes (the
//! caller bounds-checks the slice); they never fail, because every bit
//! pattern is a syntactically valid record: meaning is checked by
//! [`crate::Bootstrap`] when the record is used.

/// Inode number of the root directory. Inode `n` is record `n - 1`.
pub const ROOT_INO: u32 = 1;

/// blake3 digest of a chunk's uncompressed bytes.
pub type ChunkDigest = [u8; 32];

/// Reads little-endian integers at fixed positions of a record.
pub(crate) struct Fields<'a>(pub &'a [u8]);

impl Fields<'_> {
    pub fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }
    pub fn u32(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_le_bytes(b)
    }
    pub fn u64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }
    pub fn i64(&self, at: usize) -> i64 {
        self.u64(at) as i64
    }
    pub fn bytes32(&self, at: usize) -> [u8; 32] {
        let mut b = [0u8; 32];
        b.copy_from_slice(&self.0[at..at + 32]);
        b
    }
}

/// The type of an inode, from the file-type bits of its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InodeKind {
    Directory,
    RegularFile,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl InodeKind {
    /// The `S_IFMT` bits for this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            InodeKind::Directory => 0o040000,
            InodeKind::RegularFile => 0o100000,
            InodeKind::Symlink => 0o120000,
            InodeKind::CharDevice => 0o020000,
            InodeKind::BlockDevice => 0o060000,
            InodeKind::Fifo => 0o010000,
            InodeKind::Socket => 0o140000,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`, if any.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & 0o170000 {
            0o040000 => InodeKind::Directory,
            0o100000 => InodeKind::RegularFile,
            0o120000 => InodeKind::Symlink,
            0o020000 => InodeKind::CharDevice,
            0o060000 => InodeKind::BlockDevice,
            0o010000 => InodeKind::Fifo,
            0o140000 => InodeKind::Socket,
            _ => return None,
        })
    }
}

/// One inode (48 bytes). The meaning of `data_first`/`data_count` depends on
/// the kind: a directory's dirents, a regular file's chunk list, a symlink's
/// target in the string table, a device's major and minor number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InodeRecord {
    /// Full `st_mode`: file type bits and permission bits (incl. setuid, setgid, sticky).
    pub mode: u32,
    /// Number of directory entries naming this inode (directories: 2 + subdirectories).
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular file: size in bytes. Symlink: target length. Others: 0.
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Inode number of the directory holding this inode's first entry.
    pub parent: u32,
    /// Directory: first dirent index. Regular file: first file-chunk index.
    /// Symlink: string offset of the target. Device: major number.
    pub data_first: u32,
    /// Directory: number of dirents. Regular file: number of chunk pieces.
    /// Symlink: target length. Device: minor number. Others: 0.
    pub data_count: u32,
}

impl InodeRecord {
    pub const SIZE: usize = 48;

    pub fn kind(&self) -> Option<InodeKind> {
        InodeKind::from_mode(self.mode)
    }

    /// Device major and minor numbers (meaningful for device inodes only).
    pub fn rdev(&self) -> (u32, u32) {
        (self.data_first, self.data_count)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.mode.to_le_bytes());
        out.extend_from_slice(&self.nlink.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime_sec.to_le_bytes());
        out.extend_from_slice(&self.mtime_nsec.to_le_bytes());
        out.extend_from_slice(&self.parent.to_le_bytes());
        out.extend_from_slice(&self.data_first.to_le_bytes());
        out.extend_from_slice(&self.data_count.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Self {
        let f = Fields(b);
        InodeRecord {
            mode: f.u32(0),
            nlink: f.u32(4),
            uid: f.u32(8),
            gid: f.u32(12),
            size: f.u64(16),
            mtime_sec: f.i64(24),
            mtime_nsec: f.u32(32),
            parent: f.u32(36),
            data_first: f.u32(40),
            data_count: f.u32(44),
        }
    }
}

/// One directory entry (12 bytes): a name in the string table and the inode
/// it names. A directory's entries are contiguous and sorted by name bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirentRecord {
    pub name_offset: u32,
    pub ino: u32,
    pub name_len: u16,
}

impl DirentRecord {
    pub const SIZE: usize = 12;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.name_offset.to_le_bytes());
        out.extend_from_slice(&self.ino.to_le_bytes());
        out.extend_from_slice(&self.name_len.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Self {
        let f = Fields(b);
        DirentRecord { name_offset: f.u32(0), ino: f.u32(4), name_len: f.u16(8) }
    }
}

/// One piece of a regular file (16 bytes): from `file_offset` on, the file's
/// bytes are those of chunk `chunk_index` from `chunk_offset` on. A piece
/// ends where the next one starts (the last one at the file's size). A large
/// file's pieces are whole chunks (`chunk_offset` 0); small files share
/// chunks (chunk groups), each file a piece of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileChunkRecord {
    pub file_offset: u64,
    pub chunk_index: u32,
    pub chunk_offset: u32,
}

impl FileChunkRecord {
    pub const SIZE: usize = 16;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.file_offset.to_le_bytes());
        out.extend_from_slice(&self.chunk_index.to_le_bytes());
        out.extend_from_slice(&self.chunk_offset.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Self {
        let f = Fields(b);
        FileChunkRecord { file_offset: f.u64(0), chunk_index: f.u32(8), chunk_offset: f.u32(12) }
    }
}

/// Largest blob offset a chunk record can hold (48 bits).
pub const MAX_BLOB_OFFSET: u64 = (1 << 48) - 1;
/// Most blobs a bootstrap can name (blob indexes are 16 bits).
pub const MAX_BLOBS: u32 = 1 << 16;

/// One unique chunk (48 bytes): where its stored bytes are and what they
/// must decode to. The stored bytes are one zstd frame when they are fewer
/// than the uncompressed bytes, and the raw bytes when they are as many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkRecord {
    /// blake3 of the uncompressed bytes.
    pub digest: ChunkDigest,
    /// Offset of the stored bytes inside the blob (at most [`MAX_BLOB_OFFSET`]).
    pub compressed_offset: u64,
    /// Index into the blob table (below [`MAX_BLOBS`]).
    pub blob_index: u32,
    pub compressed_size: u32,
    pub uncompressed_size: u32,
}

impl ChunkRecord {
    pub const SIZE: usize = 48;

    /// Whether the stored bytes are a zstd frame (fewer than the data's).
    pub fn is_zstd(&self) -> bool {
        self.compressed_size < self.uncompressed_size
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&self.compressed_offset.to_le_bytes()[..6]);
        out.extend_from_slice(&(self.blob_index as u16).to_le_bytes());
        out.extend_from_slice(&self.compressed_size.to_le_bytes());
        out.extend_from_slice(&self.uncompressed_size.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Self {
        let f = Fields(b);
        ChunkRecord { digest: f.bytes32(0), compressed_offset: f.u64(32) & MAX_BLOB_OFFSET, blob_index: f.u16(38) as u32, compressed_size: f.u32(40), uncompressed_size: f.u32(44) }
    }
}

/// One blob (48 bytes): the sha256 digest (OCI content address) and size of
/// a blob of concatenated chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlobRecord {
    pub sha256: [u8; 32],
    pub size: u64,
}

impl BlobRecord {
    pub const SIZE: usize = 48;

    /// The OCI digest string, `sha256:<hex>`.
    pub fn digest_string(&self) -> String {
        let mut s = String::with_capacity(71);
        s.push_str("sha256:");
        for b in self.sha256 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Self {
        let f = Fields(b);
        BlobRecord { sha256: f.bytes32(0), size: f.u64(32) }
    }
}

/// One extended attribute (20 bytes): the inode it belongs to, and its name
/// and value in the string table. The table is sorted by inode, so an
/// inode's xattrs are found by binary search and inodes without any cost
/// nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XattrRecord {
    pub ino: u32,
    pub name_offset: u32,
    pub value_offset: u32,
    pub name_len: u32,
    pub value_len: u32,
}

impl XattrRecord {
    pub const SIZE: usize = 20;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ino.to_le_bytes());
        out.extend_from_slice(&self.name_offset.to_le_bytes());
        out.extend_from_slice(&self.value_offset.to_le_bytes());
        out.extend_from_slice(&self.name_len.to_le_bytes());
        out.extend_from_slice(&self.value_len.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Self {
        let f = Fields(b);
        XattrRecord { ino: f.u32(0), name_offset: f.u32(4), value_offset: f.u32(8), name_len: f.u32(12), value_len: f.u32(16) }
    }
}

/// How the image was chunked; recorded in the header for inspection and so
/// that a later conversion can reuse the same parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkingParams {
    /// Fixed-size chunks of `size` bytes (a power of two).
    Fixed { size: u32 },
    /// Content-defined chunking (FastCDC) with these bounds.
    ContentDefined { min: u32, avg: u32, max: u32 },
}

impl ChunkingParams {
    /// The largest chunk these parameters can produce.
    pub fn max_chunk_size(&self) -> u32 {
        match *self {
            ChunkingParams::Fixed { size } => size,
            ChunkingParams::ContentDefined { max, .. } => max,
        }
    }
}
