//! [`NaiadFs`]: the read-only `fuser::Filesystem` of a naiad image.
//!
//! Metadata requests (lookup, getattr, readdir, readlink, xattrs, statfs)
//! are answered from the in-memory bootstrap, reading only the records they
//! need. Reads map the requested range to the chunks covering it and get
//! their bytes from the [`ChunkCache`]; when a read needs several chunks that
//! are not cached, those lying close together in one blob are fetched with
//! one store request. Each read is timed into the read-latency histogram
//! and, with `--record-trace`, reported to the [`TraceRecorder`]. A read that
//! cannot be served is answered with EIO (the cache has logged why).
//!
//! Everything that would modify the image answers `EROFS`. The image never
//! changes under a mount, so entries, attributes, directory listings and
//! file pages are cached by the kernel for as long as it likes (long TTLs,
//! `FOPEN_KEEP_CACHE`, `FOPEN_CACHE_DIR`), including negative lookups.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use naiad_format::{Bootstrap, ChunkDigest, ChunkRecord, FileChunk, InodeKind, InodeRecord};
use naiad_reader::NaiadImage;

use crate::attr::{dir_size, file_attr, file_type, BLOCK_SIZE};
use crate::backing_files::BackingFiles;
use crate::chunk_cache::ChunkCache;
use crate::counters::{add, get, inc, state, Counters, Origin};
use crate::page_push::PagePusher;
use crate::passthrough::{Opened, Passthrough, FH_CACHED};
use crate::read_ahead::{
    first_read_loads, is_package_init, is_program, loads_by_window, loads_with_package, BackgroundLoads, DirectoryLoads, MappedWindows, ReadAhead, BYTECODE_DIR,
    DIRECTORY_LOAD_MAX, DIRECTORY_SCAN_MAX, SMALL_FILE_MAX,
};
use crate::read_pool::ReadPool;
use crate::trace_recorder::TraceRecorder;

/// Largest read and write the kernel is asked to send (it may cap lower).
pub const MAX_IO_SIZE: u32 = 1 << 20;

/// The kernel read-ahead of a mount that runs from a startup set or records
/// one ([`NaiadFs::kernel_readahead`]).
pub const STARTUP_SET_READAHEAD: u32 = 4 << 10;

/// What the image's xattrs are, computed once: which namespaces
/// (`user`, `security`, `trusted`, `system`) hold any, and whether any is
/// a POSIX ACL.
#[derive(Debug, Default)]
struct XattrSummary {
    namespaces: std::collections::HashSet<Vec<u8>>,
    acls: bool,
}

impl XattrSummary {
    fn of(b: &Bootstrap) -> Self {
        let mut s = XattrSummary::default();
        for name in b.xattr_names().unwrap_or_default() {
            s.acls |= name.starts_with(b"system.posix_acl_");
            s.namespaces.insert(namespace(name).to_vec());
        }
        s
    }
}

/// The namespace of an xattr name: what precedes its first dot.
fn namespace(name: &[u8]) -> &[u8] {
    name.split(|&c| c == b'.').next().unwrap_or(name)
}

/// Totals reported by statfs, computed once.
#[derive(Debug, Clone, Copy)]
struct FsTotals {
    bytes: u64,
    inodes: u64,
}

/// A FUSE read's reply. It counts the read (`reads` and its latency) just
/// before answering, so a reader that has its bytes also sees them counted.
struct ReadReply {
    reply: ReplyData,
    counters: Arc<Counters>,
    start: Instant,
    ino: u64,
    offset: u64,
    size: u32,
}

impl ReadReply {
    fn data(self, bytes: &[u8]) {
        let reply = self.count();
        reply.data(bytes)
    }

    fn error(self, e: Errno) {
        let reply = self.count();
        reply.error(e)
    }

    /// Counted together so the histogram's count equals `reads`.
    fn count(self) -> ReplyData {
        let waited = self.start.elapsed();
        self.counters.read_latency.observe(waited);
        inc(&self.counters.reads);
        if waited > SLOW_READ {
            tracing::debug!("read of inode {} at {} ({} bytes) waited {waited:?}", self.ino, self.offset, self.size);
        }
        self.reply
    }
}

/// One read, mapped to its chunks: served on the FUSE worker when they are
/// all cached, else on the [`ReadPool`].
struct ReadJob {
    cache: Arc<ChunkCache>,
    counters: Arc<Counters>,
    ino: u32,
    offset: u64,
    end: u64,
    chunks: Vec<FileChunk>,
    /// The read covers the file's last byte.
    reaches_end: bool,
    /// The file's size.
    file_size: u64,
    /// The directory the file was first found in.
    parent: u32,
}

impl ReadJob {
    /// The chunks neither cache holds (looked up once per read).
    fn missing(&self) -> Vec<ChunkRecord> {
        self.chunks.iter().map(|c| c.chunk).filter(|c| !self.cache.is_cached(c)).collect()
    }

    /// Gets the chunks (several `missing` ones of a blob with one request
    /// each) and answers the read with their bytes, or EIO.
    fn serve(self, missing: &[ChunkRecord], reply: ReadReply) {
        let ReadJob { cache, counters, ino, offset, end, chunks, .. } = self;
        let mut loaded = HashMap::new();
        if missing.len() > 1 {
            loaded = cache.load_for_read(missing);
        }
        let mut out: Vec<u8> = Vec::new();
        for c in &chunks {
            let got = match loaded.get(&c.chunk.digest) {
                Some(r) => r.clone(),
                None => cache.get(&c.chunk),
            };
            let data = match got {
                Ok(d) => d,
                Err(e) => {
                    // ChunkCache has logged blob and offset.
                    tracing::debug!("inode {ino}: read {offset}+{}: EIO: {e}", end - offset);
                    inc(&counters.read_errors);
                    return reply.error(Errno::EIO);
                }
            };
            // The file's piece of the chunk (all of it, or a small file's
            // share of a chunk group); the bootstrap checked it lies inside.
            let Some(piece) = c.slice(&data) else {
                tracing::error!("inode {ino}: chunk {} decoded to fewer bytes than its piece", c.chunk_index);
                inc(&counters.read_errors);
                return reply.error(Errno::EIO);
            };
            let from = offset.max(c.file_offset);
            let to = end.min(c.file_end());
            if from >= to {
                continue;
            }
            let slice = &piece[(from - c.file_offset) as usize..(to - c.file_offset) as usize];
            if chunks.len() == 1 {
                // The common case: answer straight from the cached chunk.
                add(&counters.read_bytes, slice.len() as u64);
                return reply.data(slice);
            }
            if out.is_empty() {
                out.reserve((end - offset) as usize);
            }
            out.extend_from_slice(slice);
        }
        add(&counters.read_bytes, out.len() as u64);
        reply.data(&out)
    }
}

/// A mounted naiad image.
pub struct NaiadFs {
    image: Arc<NaiadImage>,
    chunks: Arc<ChunkCache>,
    counters: Arc<Counters>,
    ttl: Duration,
    totals: FsTotals,
    recorder: Option<Arc<TraceRecorder>>,
    /// Puts the startup set's pages in the page cache ([`PagePusher`]).
    pusher: Option<Arc<PagePusher>>,
    /// Where reads that wait for the store are served; `None`: on the FUSE
    /// worker itself.
    pool: Option<Arc<ReadPool>>,
    /// Whole files in the cache that reads are served from; `None`: no
    /// disk cache.
    backing: Option<Arc<BackingFiles>>,
    /// Opens served by the kernel from backing files (`--passthrough`);
    /// `None`: opens are zero-message.
    passthrough: Option<Arc<Passthrough>>,
    xattrs: XattrSummary,
    /// blake3 of `n` zero bytes, by `n`, for the chunks that may be holes.
    zero_digests: std::sync::Mutex<HashMap<u32, naiad_format::ChunkDigest>>,
    /// Sequential read-ahead per file.
    read_ahead: Arc<ReadAhead>,
    /// Sequential read-ahead loads running now (at most [`READ_AHEAD_LOADS`]).
    read_ahead_loads: BackgroundLoads,
    /// Loads of programs and libraries at their first read running now.
    first_read_loads: BackgroundLoads,
    /// Window loads of programs and libraries running now.
    window_loads: BackgroundLoads,
    /// Directory loads running now.
    directory_loads_running: BackgroundLoads,
    /// Whether each inode asked about has a chunk in the prefetch table.
    prefetch_files: std::sync::Mutex<HashMap<u32, bool>>,
    /// Files of the set a read has taken off the recording
    /// ([`NaiadFs::defers_to_startup_set`]).
    left_recording: std::sync::Mutex<std::collections::HashSet<u32>>,
    /// Programs and libraries seen at lookup or in readdirplus
    /// ([`crate::read_ahead::is_program`]): loaded ahead at their first read,
    /// and by window if large ([`crate::read_ahead::loads_by_window`]).
    programs: std::sync::Mutex<std::collections::HashSet<u32>>,
    /// The windows of those being loaded or loaded.
    mapped_windows: MappedWindows,
    /// Directories whose small files are read from the store, to load the
    /// rest of one in the background ([`DirectoryLoads`]).
    directory_loads: DirectoryLoads,
}

/// Background loads that may run at once, per kind: sequential
/// read-ahead, programs and libraries at their first read, their windows,
/// and directories. Each kind has its own slots, so a burst of one never
/// starves the others (with 2 directory slots instead of 4, `import
/// numpy`'s package load found both busy with the standard library's). A
/// sequential window asked for beyond that is left to the reader's own
/// requests; a program's window or a directory is tried again at its next
/// read.
const READ_AHEAD_LOADS: usize = 4;
const FIRST_READ_LOADS: usize = 8;
const WINDOW_LOADS: usize = 4;
const DIRECTORY_LOADS: usize = 4;

/// A read that waits longer is logged at debug level.
const SLOW_READ: Duration = Duration::from_millis(2);

/// An inode number from the kernel as a bootstrap inode number.
fn ino32(ino: INodeNo) -> Option<u32> {
    u32::try_from(ino.0).ok().filter(|&i| i != 0)
}

impl NaiadFs {
    /// A filesystem over `image`, reading file bytes through `chunks`;
    /// `ttl` is how long the kernel may cache entries and attributes.
    pub fn new(image: Arc<NaiadImage>, chunks: Arc<ChunkCache>, ttl: Duration) -> Self {
        let b = &image.bootstrap;
        let mut bytes = 0u64;
        for ino in 1..=b.inode_count() {
            if let Ok(r) = b.inode(ino) {
                if r.kind() == Some(InodeKind::RegularFile) {
                    bytes = bytes.saturating_add(r.size);
                }
            }
        }
        let totals = FsTotals { bytes, inodes: b.inode_count() as u64 };
        let counters = chunks.counters().clone();
        let xattrs = XattrSummary::of(b);
        NaiadFs {
            image,
            chunks,
            counters,
            ttl,
            totals,
            recorder: None,
            pusher: None,
            pool: None,
            backing: None,
            passthrough: None,
            xattrs,
            zero_digests: Default::default(),
            read_ahead: Default::default(),
            read_ahead_loads: BackgroundLoads::new(READ_AHEAD_LOADS),
            first_read_loads: BackgroundLoads::new(FIRST_READ_LOADS),
            window_loads: BackgroundLoads::new(WINDOW_LOADS),
            directory_loads_running: BackgroundLoads::new(DIRECTORY_LOADS),
            prefetch_files: Default::default(),
            left_recording: Default::default(),
            programs: Default::default(),
            mapped_windows: Default::default(),
            directory_loads: Default::default(),
        }
    }

    /// Hands the startup set's pages to the kernel as files of the set are
    /// read ([`PagePusher`]).
    pub fn with_page_pusher(mut self, pusher: Option<Arc<PagePusher>>) -> Self {
        self.pusher = pusher;
        self
    }

    /// Reports every read to `recorder` (`--record-trace`).
    pub fn with_recorder(mut self, recorder: Option<Arc<TraceRecorder>>) -> Self {
        self.recorder = recorder;
        self
    }

    /// Reads ahead of sequential readers in windows up to `max_window`
    /// bytes (0: no read-ahead).
    pub fn with_read_ahead(mut self, max_window: u64) -> Self {
        self.read_ahead = Arc::new(ReadAhead::new(max_window));
        self
    }

    /// The read-ahead loads running in the background, to wait for at exit.
    pub fn background_loads(&self) -> Vec<BackgroundLoads> {
        vec![self.read_ahead_loads.clone(), self.first_read_loads.clone(), self.window_loads.clone(), self.directory_loads_running.clone()]
    }

    /// Serves reads that must wait for the store on `pool`.
    pub fn with_read_pool(mut self, pool: Arc<ReadPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Serves reads from `backing` files, and opens of files that have
    /// one by kernel `passthrough` when given.
    pub fn with_backing_files(mut self, backing: Option<Arc<BackingFiles>>, passthrough: Option<Arc<Passthrough>>) -> Self {
        self.backing = backing;
        self.passthrough = passthrough;
        self
    }

    fn bootstrap(&self) -> &Bootstrap {
        &self.image.bootstrap
    }

    /// The record and kind of inode `ino`, or the errno to answer.
    fn inode(&self, ino: INodeNo) -> Result<(u32, InodeRecord, InodeKind), Errno> {
        let i = ino32(ino).ok_or(Errno::ENOENT)?;
        let r = self.bootstrap().inode(i).map_err(|_| Errno::ENOENT)?;
        // The bootstrap was validated at open: every inode has a kind.
        let kind = r.kind().ok_or(Errno::EIO)?;
        Ok((i, r, kind))
    }

    fn attr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let (i, r, kind) = self.inode(ino)?;
        self.attr_of(i, &r, kind)
    }

    /// The attributes of inode `i` (record `r`), directory sizes included.
    fn attr_of(&self, i: u32, r: &InodeRecord, kind: InodeKind) -> Result<FileAttr, Errno> {
        let mut a = file_attr(i, r, kind);
        if kind == InodeKind::Directory {
            let entries = self.bootstrap().dir_entries(i).map_err(|_| Errno::EIO)?;
            a.size = dir_size(entries.iter().map(|e| e.name.len()));
            a.blocks = a.size / 512;
        } else if kind == InodeKind::RegularFile && r.data_count > 1 {
            a.blocks = self.allocated_blocks(i, r)?;
        }
        Ok(a)
    }

    /// `st_blocks` of a regular file: its chunks that are not all zeros
    /// (holes of a sparse file, or zeros a writer stored), in 512-byte
    /// units. A chunk can only be zeros if it compresses to almost nothing;
    /// only those are compared with the digest of that many zeros. A share
    /// of a chunk group counts as data.
    fn allocated_blocks(&self, i: u32, r: &InodeRecord) -> Result<u64, Errno> {
        let chunks = self.bootstrap().file_chunks(i).map_err(|_| Errno::EIO)?;
        let mut data = 0u64;
        for c in &chunks {
            let len = c.len;
            let maybe_zeros = c.is_whole_chunk() && c.chunk.is_zstd() && (c.chunk.compressed_size as u64) * 256 < len as u64;
            let zeros = maybe_zeros && {
                let mut known = self.zero_digests.lock().unwrap_or_else(|p| p.into_inner());
                *known.entry(len).or_insert_with(|| *blake3::hash(&vec![0u8; len as usize]).as_bytes()) == c.chunk.digest
            };
            if !zeros {
                data += len as u64;
            }
        }
        Ok(data.min(r.size).div_ceil(512))
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<Option<FileAttr>, Errno> {
        let (p, _, kind) = self.inode(parent)?;
        if kind != InodeKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        match self.bootstrap().lookup(p, name.as_bytes()).map_err(|_| Errno::EIO)? {
            Some(child) => {
                let (i, r, kind) = self.inode(INodeNo(child as u64))?;
                self.note_name(i, &r, kind, name.as_bytes());
                if let Some(rec) = self.recorder.as_ref().filter(|_| kind == InodeKind::RegularFile && r.nlink > 1) {
                    rec.note_lookup(p, name.as_bytes(), i);
                }
                Ok(Some(self.attr_of(i, &r, kind)?))
            }
            None => Ok(None),
        }
    }

    /// What a name shows of a file the kernel learns of (by lookup, or by
    /// readdirplus, after which it looks the name up no more): programs
    /// and libraries are loaded ahead of their faults.
    fn note_name(&self, ino: u32, r: &InodeRecord, kind: InodeKind, name: &[u8]) {
        if kind == InodeKind::RegularFile && self.read_ahead.max_window() > 0 && crate::read_ahead::is_program(name, r.mode, r.size) {
            if let Ok(mut programs) = self.programs.lock() {
                programs.insert(ino);
            }
        }
    }

    /// Entry `pos` of directory `dir` as (inode, kind, name): positions 0
    /// and 1 are "." and "..", then the bootstrap's entries in order.
    fn dir_entry(&self, dir: u32, rec: &InodeRecord, pos: u64) -> Result<Option<(u32, InodeKind, Vec<u8>)>, Errno> {
        match pos {
            0 => Ok(Some((dir, InodeKind::Directory, b".".to_vec()))),
            1 => {
                let parent = if dir == naiad_format::ROOT_INO { dir } else { rec.parent };
                Ok(Some((parent, InodeKind::Directory, b"..".to_vec())))
            }
            _ => match self.bootstrap().dir_entry(dir, pos - 2).map_err(|_| Errno::EIO)? {
                None => Ok(None),
                Some(e) => {
                    let child = self.bootstrap().inode(e.ino).map_err(|_| Errno::EIO)?;
                    let kind = child.kind().ok_or(Errno::EIO)?;
                    Ok(Some((e.ino, kind, e.name.to_vec())))
                }
            },
        }
    }

    /// Hands the entries of directory `ino` from position `offset` on to
    /// `add(child, kind, name, next position)` until it answers that the
    /// kernel's buffer is full.
    fn list_dir(&self, ino: INodeNo, offset: u64, mut add: impl FnMut(u32, InodeKind, &[u8], u64) -> Result<bool, Errno>) -> Result<(), Errno> {
        let (dir, rec) = self.open_dir(ino)?;
        let mut pos = offset;
        while let Some((child, kind, name)) = self.dir_entry(dir, &rec, pos)? {
            if add(child, kind, &name, pos + 1)? {
                break;
            }
            pos += 1;
        }
        Ok(())
    }

    fn open_dir(&self, ino: INodeNo) -> Result<(u32, InodeRecord), Errno> {
        let (i, r, kind) = self.inode(ino)?;
        if kind != InodeKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        Ok((i, r))
    }

    /// The bytes `[offset, offset + size)` of regular file `ino` (short at
    /// the end of the file).
    /// The part of a read that needs only the bootstrap: which chunks cover
    /// it. `Err` is the reply to give at once; `Ok(None)` an empty read.
    fn plan_read(&self, ino: INodeNo, offset: u64, size: u32) -> Result<Option<ReadJob>, Errno> {
        let (i, r, kind) = self.inode(ino)?;
        if kind != InodeKind::RegularFile {
            return Err(if kind == InodeKind::Directory { Errno::EISDIR } else { Errno::EINVAL });
        }
        if offset >= r.size || size == 0 {
            return Ok(None);
        }
        let end = r.size.min(offset.saturating_add(size as u64));
        if let Some(rec) = &self.recorder {
            rec.record(i, offset, end - offset);
        }
        let chunks = self.bootstrap().file_chunks_in_range(i, offset, end - offset).map_err(|e| {
            tracing::error!("inode {i}: cannot map read {offset}+{size} to chunks: {e}");
            inc(&self.counters.read_errors);
            Errno::EIO
        })?;
        Ok(Some(ReadJob {
            cache: self.chunks.clone(),
            counters: self.counters.clone(),
            ino: i,
            offset,
            end,
            chunks,
            reaches_end: end == r.size,
            file_size: r.size,
            parent: r.parent,
        }))
    }

    /// Serves a read from the backing file of `ino` if it has one; gives
    /// the reply back otherwise (or if the backing file failed the read).
    fn read_backing(&self, ino: INodeNo, offset: u64, size: u32, reply: ReadReply) -> Option<ReadReply> {
        let (Some(backing), Some(i)) = (&self.backing, ino32(ino)) else { return Some(reply) };
        let Some(file) = backing.reader(i) else { return Some(reply) };
        let mut buf = vec![0u8; size as usize];
        let mut have = 0;
        while have < buf.len() {
            match std::os::unix::fs::FileExt::read_at(&*file, &mut buf[have..], offset + have as u64) {
                Ok(0) => break,
                Ok(n) => have += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("inode {i}: reading its backing file: {e}; reading its chunks instead");
                    backing.forget_reader(i);
                    return Some(reply);
                }
            }
        }
        inc(&self.counters.backing_reads);
        add(&self.counters.read_bytes, have as u64);
        reply.data(&buf[..have]);
        None
    }

    /// Serves a read from the chunks covering it: on the FUSE worker when
    /// they are all cached, else on the read pool.
    fn read_chunks(&self, ino: INodeNo, offset: u64, size: u32, reply: ReadReply) {
        match self.plan_read(ino, offset, size) {
            Err(e) => reply.error(e),
            Ok(None) => reply.data(&[]),
            Ok(Some(job)) => {
                let missing = job.missing();
                let defer_to_set = self.defers_to_startup_set(&job, &missing);
                let program = !defer_to_set && !missing.is_empty() && self.programs.lock().map(|m| m.contains(&job.ino)).unwrap_or(false);
                // Programs and libraries: at the headers, what the loader
                // reads next; then the windows each read falls in.
                let mapped = program && loads_by_window(job.file_size);
                // Background loads this read starts leave out the chunks it
                // fetches itself: claimed by a load, a chunk at the end of
                // its request would keep the read waiting for all of it.
                if program && job.offset == 0 {
                    for (from, to) in first_read_loads(job.file_size) {
                        self.start_read_ahead(job.ino, from, to, &self.first_read_loads, &missing);
                    }
                }
                if mapped {
                    for (from, to) in self.mapped_windows.start(job.ino, job.offset, job.end, job.file_size) {
                        if !self.start_read_ahead(job.ino, from, to, &self.window_loads, &missing) {
                            self.mapped_windows.forget(job.ino, from);
                        }
                    }
                }
                if let Some((from, to)) = (!defer_to_set).then(|| self.read_ahead.observe(job.ino, job.offset, job.end, job.file_size)).flatten() {
                    self.start_read_ahead(job.ino, from, to, &self.read_ahead_loads, &missing);
                }
                // Read to its end: maybe all local now (no RELEASE comes
                // with zero-message opens). Offered once answered.
                let offer = self.backing.clone().filter(|_| job.reaches_end).map(|b| (b, job.ino));
                let offer = move || {
                    if let Some((b, ino)) = offer {
                        b.offer(ino);
                    }
                };
                // Not for a read that follows the recording: it knows
                // which files the startup reads, and its read waits for
                // the set's own fetch (loading the directory's other files
                // would only slow that down).
                if !missing.is_empty() && !mapped && job.file_size <= SMALL_FILE_MAX && self.read_ahead.max_window() > 0 && !defer_to_set {
                    let dirs: Vec<u32> = std::iter::once(job.parent)
                        .chain(self.subpackage_bytecode_dirs(job.parent, job.ino))
                        .filter(|&dir| self.directory_loads.observe_cold_read(dir, program))
                        .collect();
                    if !dirs.is_empty() {
                        // Left out (all slots busy, or the load was full):
                        // tried again at their next cold read.
                        let left_out = self.start_directory_load(&dirs, program, &missing).unwrap_or(dirs);
                        for dir in left_out {
                            self.directory_loads.forget(dir, program);
                        }
                    }
                }
                match &self.pool {
                    // Waiting for the store happens off the FUSE worker.
                    Some(pool) if !missing.is_empty() => {
                        pool.submit(move || {
                            job.serve(&missing, reply);
                            offer();
                        });
                    }
                    _ => {
                        job.serve(&missing, reply);
                        offer();
                    }
                }
            }
        }
    }

    /// Whether a read starts no loads ahead because the startup set's own
    /// fetch has the link: a read of a file of the set that waits for no
    /// chunk but the set's follows the recording, and loads ahead would
    /// only slow the set. A read that waits for a chunk the set lacks has
    /// left the recording (another command, other input): its file reads
    /// ahead as any file does from then on, once the set's fetch is over:
    /// until then a stray fault (thread timing) fetches its own chunk only,
    /// and the set keeps the link.
    fn defers_to_startup_set(&self, job: &ReadJob, missing: &[ChunkRecord]) -> bool {
        if !self.in_prefetch_set(job.ino) {
            return false;
        }
        let Ok(mut left) = self.left_recording.lock() else { return false };
        if !left.contains(&job.ino) {
            let set = self.image.startup_set();
            if job.chunks.iter().all(|c| set.contains(c.chunk_index) || !missing.contains(&c.chunk)) {
                return true;
            }
            tracing::debug!("inode {}: read at {} left the recording", job.ino, job.offset);
            left.insert(job.ino);
        }
        get(&self.counters.progress.state) == state::RUNNING
    }

    /// Whether the image's prefetch table (a recorded startup) holds a
    /// chunk of inode `ino`: then the recording knows which of its bytes
    /// the startup reads, better than a guess. Remembered per inode.
    fn in_prefetch_set(&self, ino: u32) -> bool {
        let set = self.image.startup_set();
        if set.is_empty() {
            return false;
        }
        let Ok(mut known) = self.prefetch_files.lock() else { return true };
        *known.entry(ino).or_insert_with(|| self.bootstrap().file_chunks_in_range(ino, 0, u64::MAX).map(|p| p.iter().any(|c| set.contains(c.chunk_index))).unwrap_or(true))
    }

    /// Loads the chunks of `[from, to)` of inode `ino` that no cache holds,
    /// in the background, one window of the largest request's size after
    /// the other (each claimed only when its turn comes, so a reader
    /// faulting in a later part meanwhile fetches it itself rather than
    /// waiting); not the chunks in `skip`. False if it could not start
    /// (all slots of `loads` busy).
    fn start_read_ahead(&self, ino: u32, from: u64, to: u64, loads: &BackgroundLoads, skip: &[ChunkRecord]) -> bool {
        let Ok(pieces) = self.bootstrap().file_chunks_in_range(ino, from, to - from) else { return true };
        // (load_batch drops duplicates: a chunk group's pieces share one.)
        let pieces: Vec<_> = pieces.into_iter().filter(|p| !self.chunks.is_cached(&p.chunk) && !skip.iter().any(|s| s.digest == p.chunk.digest)).collect();
        if pieces.is_empty() {
            return true;
        }
        let window = self.chunks.merge_limits().max_request.max(1);
        let batches = pieces.chunk_by(|a, b| a.file_offset.saturating_sub(from) / window == b.file_offset.saturating_sub(from) / window);
        self.load_in_background(loads, "naiad-readahead", batches.map(|part| part.iter().map(|p| p.chunk).collect()).collect())
    }

    /// Loads `batches` one after the other on a thread of its own, under a
    /// slot of `loads`; false if all its slots are busy.
    fn load_in_background(&self, loads: &BackgroundLoads, thread: &str, batches: Vec<Vec<ChunkRecord>>) -> bool {
        let Some(slot) = loads.try_start() else { return false };
        tracing::debug!("{thread}: loading {} chunks in the background", batches.iter().map(Vec::len).sum::<usize>());
        let cache = self.chunks.clone();
        let loads = loads.clone();
        // (A thread that cannot be spawned drops its slot with the closure.)
        let _ = std::thread::Builder::new().name(thread.into()).spawn(move || {
            for chunks in batches {
                if loads.stopping() {
                    break;
                }
                cache.load_batch_until(&chunks, Origin::ReadAhead, |_| {}, &|| loads.stopping());
            }
            drop(slot);
        });
        true
    }

    /// Loads the small files of directories `dirs` that no cache holds in
    /// the background, programs and libraries or (if not `programs`) the
    /// other files ([`DirectoryLoads`]), with as few requests as the merge
    /// limits allow. Not a directory whose small files are more than
    /// [`DIRECTORY_LOAD_MAX`] stored bytes or that has more than
    /// [`DIRECTORY_SCAN_MAX`] entries, not the files the prefetch table
    /// covers nor the chunks in `skip`; no directory once the load would
    /// pass [`DIRECTORY_LOAD_MAX`] in all: those are returned, left for
    /// later. `None` if it should have started but could not (all
    /// directory-load slots busy).
    fn start_directory_load(&self, dirs: &[u32], programs: bool, skip: &[ChunkRecord]) -> Option<Vec<u32>> {
        let b = self.bootstrap();
        let mut chunks: Vec<ChunkRecord> = Vec::new();
        let mut seen: HashSet<ChunkDigest> = skip.iter().map(|c| c.digest).collect();
        let mut total = 0u64;
        let mut left_out = Vec::new();
        for &dir in dirs {
            let mut dir_chunks: Vec<ChunkRecord> = Vec::new();
            let mut dir_seen: HashSet<ChunkDigest> = HashSet::new();
            let mut stored = 0u64;
            let mut fits = true;
            for pos in 0.. {
                let Ok(Some(entry)) = b.dir_entry(dir, pos) else { break };
                if pos >= DIRECTORY_SCAN_MAX {
                    fits = false;
                    break;
                }
                let Ok(rec) = b.inode(entry.ino) else { continue };
                if rec.kind() != Some(InodeKind::RegularFile)
                    || rec.size > SMALL_FILE_MAX
                    || is_program(entry.name, rec.mode, rec.size) != programs
                    || self.in_prefetch_set(entry.ino)
                {
                    continue;
                }
                let Ok(pieces) = b.file_chunks_in_range(entry.ino, 0, rec.size) else { continue };
                for p in pieces {
                    if !seen.contains(&p.chunk.digest) && dir_seen.insert(p.chunk.digest) && !self.chunks.is_cached(&p.chunk) {
                        stored += p.chunk.compressed_size as u64;
                        dir_chunks.push(p.chunk);
                    }
                }
                if stored > DIRECTORY_LOAD_MAX {
                    fits = false;
                    break;
                }
            }
            if !fits {
                continue;
            }
            if total + stored > DIRECTORY_LOAD_MAX {
                left_out.push(dir);
                continue;
            }
            total += stored;
            seen.extend(dir_seen);
            chunks.extend(dir_chunks);
        }
        if chunks.is_empty() || self.load_in_background(&self.directory_loads_running, "naiad-dirload", vec![chunks]) {
            Some(left_out)
        } else {
            None
        }
    }

    /// The bytecode directories (`S/__pycache__`) of the subpackages `S` of
    /// a Python package when inode `ino` in directory `dir` is the
    /// package's compiled `__init__` (`P/__pycache__/__init__.*.pyc`),
    /// without its test suites ([`crate::read_ahead::is_package_init`]);
    /// none for any other file.
    fn subpackage_bytecode_dirs(&self, dir: u32, ino: u32) -> Vec<u32> {
        let b = self.bootstrap();
        let Ok(package) = b.inode(dir).map(|r| r.parent) else { return Vec::new() };
        let entries = |d: u32| (0..DIRECTORY_SCAN_MAX).map_while(move |pos| b.dir_entry(d, pos).ok().flatten());
        if b.lookup(package, BYTECODE_DIR).ok().flatten() != Some(dir) || !entries(dir).any(|e| e.ino == ino && is_package_init(e.name)) {
            return Vec::new();
        }
        entries(package)
            .filter(|e| e.ino != dir && loads_with_package(e.name) && b.inode(e.ino).ok().and_then(|r| r.kind()) == Some(InodeKind::Directory))
            .filter_map(|e| b.lookup(e.ino, BYTECODE_DIR).ok().flatten())
            .collect()
    }

    /// The kernel's read-ahead for this mount (the page-cache read-around of
    /// an mmap fault, and the window of sequential reads). A workload that
    /// runs from a startup set, or records one (`--record-trace`), reads with
    /// [`STARTUP_SET_READAHEAD`]: the set then holds the pages the workload
    /// touches rather than 128 KiB around each, which on `import numpy` is
    /// 6.1 MB of prefetch blob against 8.1 MB (README, startup). Others ask
    /// for [`MAX_IO_SIZE`]; the kernel caps it at its default of 128 KiB
    /// (the backing device's `read_ahead_kb`).
    fn kernel_readahead(&self) -> u32 {
        if !self.image.startup_set().is_empty() || self.recorder.is_some() {
            STARTUP_SET_READAHEAD
        } else {
            MAX_IO_SIZE
        }
    }

    fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(value.len() as u32)
        } else if value.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(value)
        }
    }
}

impl Filesystem for NaiadFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_IO_SIZE) {
            let _ = config.set_max_write(max);
        }
        let readahead = self.kernel_readahead();
        if let Err(max) = config.set_max_readahead(readahead) {
            let _ = config.set_max_readahead(max);
        }
        for flag in [InitFlags::FUSE_DO_READDIRPLUS, InitFlags::FUSE_READDIRPLUS_AUTO, InitFlags::FUSE_CACHE_SYMLINKS, InitFlags::FUSE_PARALLEL_DIROPS, InitFlags::FUSE_MAX_PAGES] {
            let _ = config.add_capabilities(flag);
        }
        if self.xattrs.acls {
            // The kernel enforces the image's ACLs and caches them (also
            // their absence), asking once per inode.
            let _ = config.add_capabilities(InitFlags::FUSE_POSIX_ACL);
        }
        if let Some(pt) = &self.passthrough {
            // Depth 1: backing files on a plain filesystem, and the mount
            // itself usable as an overlayfs lower layer.
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok();
            if !granted {
                tracing::info!("the kernel offers no FUSE passthrough: files are read through the daemon");
                pt.disable();
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent, name) {
            Ok(Some(attr)) => reply.entry(&self.ttl, &attr, Generation(0)),
            Ok(None) => {
                // A negative entry (inode 0) the kernel may cache: the image
                // cannot gain the name later.
                let mut attr = match self.attr(INodeNo::ROOT) {
                    Ok(a) => a,
                    Err(e) => return reply.error(e),
                };
                attr.ino = INodeNo(0);
                reply.entry_with_ttls(&Duration::ZERO, &self.ttl, &attr, Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(a) => reply.attr(&self.ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let Some(i) = ino32(ino) else { return reply.error(Errno::ENOENT) };
        match self.inode(ino) {
            Ok((_, _, InodeKind::Symlink)) => match self.bootstrap().symlink_target(i) {
                Ok(t) => reply.data(t),
                Err(_) => reply.error(Errno::EIO),
            },
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    /// Without passthrough, opens are zero-message: ENOSYS makes the kernel
    /// stop sending OPEN and RELEASE, and it then keeps file pages cached
    /// as FOPEN_KEEP_CACHE would. Write opens still fail: the mount is
    /// read-only (EROFS from the VFS).
    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(pt) = &self.passthrough else {
            return reply.error(Errno::ENOSYS);
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & (libc::O_TRUNC | libc::O_APPEND | libc::O_CREAT) != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.inode(ino) {
            Ok((_, _, InodeKind::Directory)) => reply.error(Errno::EISDIR),
            Ok((i, _, InodeKind::RegularFile)) => match pt.open(i, reply) {
                Opened::Done => {}
                Opened::Declined(reply) => reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE),
            },
            Ok(_) => reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn release(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock_owner: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        reply.ok();
        if let (Some(pt), Some(i)) = (&self.passthrough, ino32(ino)) {
            pt.release(i, fh.0);
            if let Some(b) = self.backing.as_ref().filter(|_| fh.0 == FH_CACHED) {
                // Read through the daemon: maybe all local now.
                b.offer(i);
            }
        }
    }

    fn read(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        let reply = ReadReply { reply, counters: self.counters.clone(), start: Instant::now(), ino: ino.0, offset, size };
        if let (Some(pusher), Some(i)) = (&self.pusher, ino32(ino)) {
            if self.in_prefetch_set(i) {
                pusher.poke(i);
            }
        }
        if self.recorder.is_none() {
            if let Some(reply) = self.read_backing(ino, offset, size, reply) {
                // Not served from a backing file: through the chunks.
                self.read_chunks(ino, offset, size, reply);
            }
            return;
        }
        self.read_chunks(ino, offset, size, reply)
    }

    /// Nothing to flush: ENOSYS makes the kernel stop sending FLUSH (one
    /// round trip per close()).
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    /// Zero-message opendir: ENOSYS makes the kernel stop sending OPENDIR
    /// and RELEASEDIR, and then it caches every directory's listing as
    /// FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR would (the VFS opens only
    /// directories as directories, read-only).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS)
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let listed = self.list_dir(ino, offset, |child, kind, name, next| Ok(reply.add(INodeNo(child as u64), next, file_type(kind), OsStr::from_bytes(name))));
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let listed = self.list_dir(ino, offset, |child, kind, name, next| {
            let (i, r, _) = self.inode(INodeNo(child as u64))?;
            self.note_name(i, &r, kind, name);
            let attr = self.attr_of(i, &r, kind)?;
            Ok(reply.add(INodeNo(child as u64), next, OsStr::from_bytes(name), &self.ttl, &attr, Generation(0)))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.totals.bytes.div_ceil(BLOCK_SIZE as u64);
        reply.statfs(blocks, 0, 0, self.totals.inodes, 0, BLOCK_SIZE, 255, BLOCK_SIZE)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if self.bootstrap().xattr_count() == 0 {
            // An image without xattrs: ENOSYS tells the kernel never to ask
            // again (it answers "not supported" itself from then on).
            return reply.error(Errno::ENOSYS);
        }
        let Some(i) = ino32(ino) else { return reply.error(Errno::ENOENT) };
        match self.bootstrap().xattrs(i) {
            Ok(list) => match list.iter().find(|(n, _)| *n == name.as_bytes()) {
                Some((_, v)) => Self::xattr_reply(v, size, reply),
                // No xattr of this namespace anywhere in the image: "not
                // supported", which tools such as ls and cp remember per
                // filesystem (ls asks every file for security.selinux and
                // its ACL otherwise). ACL names get "no data" when the
                // image has ACLs: the kernel then caches their absence.
                None if !self.xattrs.namespaces.contains(namespace(name.as_bytes())) => reply.error(Errno::EOPNOTSUPP),
                None => reply.error(Errno::NO_XATTR),
            },
            Err(_) => reply.error(Errno::ENOENT),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if self.bootstrap().xattr_count() == 0 {
            // As in getxattr: the kernel stops asking.
            return reply.error(Errno::ENOSYS);
        }
        let Some(i) = ino32(ino) else { return reply.error(Errno::ENOENT) };
        match self.bootstrap().xattrs(i) {
            Ok(list) => {
                let mut names = Vec::new();
                for (n, _) in list {
                    names.extend_from_slice(n);
                    names.push(0);
                }
                Self::xattr_reply(&names, size, reply)
            }
            Err(_) => reply.error(Errno::ENOENT),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let (_, r, kind) = match self.inode(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        let mode = r.mode;
        let allowed = if req.uid() == 0 {
            // root may read anything and execute what has an x bit.
            !mask.contains(AccessFlags::X_OK) || kind == InodeKind::Directory || mode & 0o111 != 0
        } else {
            let bits = if req.uid() == r.uid {
                (mode >> 6) & 7
            } else if req.gid() == r.gid {
                (mode >> 3) & 7
            } else {
                mode & 7
            };
            (!mask.contains(AccessFlags::R_OK) || bits & 4 != 0) && (!mask.contains(AccessFlags::X_OK) || bits & 1 != 0)
        };
        if allowed {
            reply.ok()
        } else {
            reply.error(Errno::EACCES)
        }
    }

    /// No ioctls: programs probing files (`isatty` is an ioctl) get ENOTTY
    /// quietly instead of a warning per call in the daemon's log.
    fn ioctl(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: IoctlFlags, _cmd: u32, _in_data: &[u8], _out_size: u32, reply: ReplyIoctl) {
        reply.error(Errno::ENOTTY)
    }

    // Everything below would change the image.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS)
    }

    fn mknod(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, _rdev: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }

    fn mkdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn symlink(&self, _req: &Request, _parent: INodeNo, _link_name: &OsStr, _target: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }

    fn rename(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _newparent: INodeNo, _newname: &OsStr, _flags: RenameFlags, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }

    fn write(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _offset: u64, _data: &[u8], _wf: WriteFlags, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyWrite) {
        reply.error(Errno::EROFS)
    }

    fn setxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _value: &[u8], _flags: i32, _position: u32, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn create(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, _flags: i32, reply: ReplyCreate) {
        reply.error(Errno::EROFS)
    }

    fn fallocate(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _offset: u64, _length: u64, _mode: i32, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS)
    }
}
