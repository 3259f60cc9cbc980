//! [`DiskCache`]: the persistent chunk cache. It owns the files under the
//! cache directory, this daemon's in-memory index of what they hold, the
//! background writer that fills them, and the size cap. The cache outlives
//! mounts and restarts and may be shared by several daemons at once.
//!
//! Layout, one pair of files per blob, named by the blob's sha256 (in the
//! manner of Nydus's blobcache):
//!
//! - `<dir>/blobs/<hex>.data`: a sparse file in which each cached chunk's
//!   stored bytes (as in the blob: a zstd frame, or raw) sit at the chunk's
//!   offset in the blob;
//! - `<dir>/blobs/<hex>.index`: an append-only list of [`RECORD_SIZE`]-byte
//!   records (magic, offset, stored size, checksum of the record), each
//!   appended with one `write()` *after* its chunk's bytes are in `.data`.
//!
//! A record is only a claim: a hit reads the stored bytes back and decodes
//! and verifies them against the bootstrap's chunk record
//! ([`decode_chunk`]); a chunk that fails (torn, missing, tampered) is
//! counted in `disk_corrupt`, forgotten, and is a miss, never served.
//! Records are found by their magic and checksum, so a record torn by a
//! crash costs only itself.
//!
//! Several daemons may share a directory: a chunk is always the same bytes
//! at the same offset, so concurrent writers agree, and records are small
//! appends. Each daemon keeps its own index, loaded at open and topped up
//! from a blob's index file when a lookup misses, so it sees what the
//! others wrote.
//!
//! Writes happen on a background thread. Queued chunks are served from the
//! queue, so a chunk put here is never missing in between; readers wait for
//! the writer only when more than [`WRITE_QUEUE_BYTES`] are queued.
//! [`DiskCache::flush`] (and drop) waits for queued writes.
//!
//! Size cap: the stored bytes of the indexed chunks. A write that would
//! exceed it first evicts whole blobs (both files), least recently used
//! first; recency is the last use in this process, or across restarts the
//! `.data` file's mtime, which hits refresh at most once a minute per blob.
//! A blob evicted while another daemon uses it keeps working for that
//! daemon (its open files stay readable).
//!
//! Backing files (`<dir>/files/<hex>`, see the FUSE daemon's `backing_files`) count
//! toward the same cap and are evicted with the blobs, least recently used
//! first; this module keeps their sizes and recency, not their contents.
//!
//! An old per-chunk cache (`<dir>/chunks/`) is deleted in the background.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use naiad_format::bootstrap::hex;
use naiad_format::{decode_chunk, ChunkDigest, ChunkRecord};

use crate::counters::{add, inc, Counters};
use crate::error::{IoContext, StorageError};

/// The sha256 of a blob, which names its files in the cache.
pub use crate::chunk_reader::BlobSha256;

/// Bytes (stored plus decoded) queued for the writer before readers wait.
pub const WRITE_QUEUE_BYTES: u64 = 256 << 20;
/// Size of one index record: magic (4), offset (u64 LE), stored size
/// (u32 LE), first 4 bytes of the blake3 of the preceding 16 bytes.
pub const RECORD_SIZE: usize = 20;
const RECORD_MAGIC: [u8; 4] = *b"nxc1";
/// Hits refresh a blob's `.data` mtime at most this often.
const MTIME_REFRESH: Duration = Duration::from_secs(60);
/// A `.data` without `.index` (or the reverse) older than this is a
/// leftover, not a blob another daemon is creating right now.
const ORPHAN_AGE: Duration = Duration::from_secs(600);
/// An index file larger than this is not one this code wrote.
const MAX_INDEX_BYTES: u64 = 256 << 20;
const BLOBS_DIR: &str = "blobs";
/// Where the backing files (whole files, uncompressed) live.
pub const FILES_DIR: &str = "files";
const OLD_CHUNKS_DIR: &str = "chunks";

/// One index record: a chunk's stored bytes are in `.data` at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexRecord {
    offset: u64,
    size: u32,
}

fn record_check(body: &[u8]) -> [u8; 4] {
    let h = blake3::hash(body);
    let b = h.as_bytes();
    [b[0], b[1], b[2], b[3]]
}

fn encode_record(r: IndexRecord) -> [u8; RECORD_SIZE] {
    let mut out = [0u8; RECORD_SIZE];
    out[..4].copy_from_slice(&RECORD_MAGIC);
    out[4..12].copy_from_slice(&r.offset.to_le_bytes());
    out[12..16].copy_from_slice(&r.size.to_le_bytes());
    let check = record_check(&out[..16]);
    out[16..].copy_from_slice(&check);
    out
}

fn decode_record(bytes: &[u8]) -> Option<IndexRecord> {
    let bytes = bytes.get(..RECORD_SIZE)?;
    if bytes[..4] != RECORD_MAGIC || bytes[16..] != record_check(&bytes[..16]) {
        return None;
    }
    let offset = u64::from_le_bytes(bytes[4..12].try_into().ok()?);
    let size = u32::from_le_bytes(bytes[12..16].try_into().ok()?);
    offset.checked_add(size as u64)?;
    Some(IndexRecord { offset, size })
}

/// The records in `buf` (skipping anything that is not a whole, intact
/// record) and how many bytes need not be read again. The last bytes after
/// the last good record are left for the next read: they may be a record
/// another daemon is appending right now.
fn parse_records(buf: &[u8]) -> (Vec<IndexRecord>, usize) {
    let mut records = Vec::new();
    let mut pos = 0;
    let mut good_end = 0;
    while pos + RECORD_SIZE <= buf.len() {
        match decode_record(&buf[pos..]) {
            Some(r) => {
                records.push(r);
                pos += RECORD_SIZE;
                good_end = pos;
            }
            None => pos += 1,
        }
    }
    (records, good_end.max(buf.len().saturating_sub(2 * RECORD_SIZE)))
}

/// A blob's name in the cache directory (`<64 lower-case hex>.<ext>`).
fn parse_blob_file_name(name: &str) -> Option<(BlobSha256, &str)> {
    let (stem, ext) = name.split_once('.')?;
    Some((parse_hex32(stem)?, ext))
}

/// 64 lower-case hex digits as 32 bytes (the names of blob and backing
/// files).
fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Removes a file and its marker, logging what fails.
fn remove_marked(path: &Path) {
    if let Err(e) = naiad_registry::verified_file::remove(path) {
        tracing::warn!("disk cache: cannot remove {}: {e}", path.display());
    }
}

/// The open files of a blob this process uses.
struct BlobFiles {
    data: Arc<File>,
    /// Opened for appending: every write goes to the end.
    index: Arc<File>,
    /// When a hit last refreshed the `.data` mtime.
    mtime_refreshed: Option<Instant>,
}

/// What this daemon knows a blob's cache files hold.
struct CachedBlob {
    /// Stored size of each cached chunk, by its offset in the blob.
    chunks: HashMap<u64, u32>,
    /// Sum of those sizes.
    bytes: u64,
    last_use: SystemTime,
    /// (device, inode) of the index file the records were read from.
    index_id: Option<(u64, u64)>,
    /// Bytes of that index file already read.
    index_read_to: u64,
    /// Opened on first use by this process.
    files: Option<BlobFiles>,
}

impl CachedBlob {
    fn new(last_use: SystemTime) -> Self {
        CachedBlob { chunks: HashMap::new(), bytes: 0, last_use, index_id: None, index_read_to: 0, files: None }
    }

    fn insert(&mut self, r: IndexRecord) {
        if let Some(old) = self.chunks.insert(r.offset, r.size) {
            self.bytes -= old as u64;
        }
        self.bytes += r.size as u64;
    }

    fn remove(&mut self, offset: u64) {
        if let Some(old) = self.chunks.remove(&offset) {
            self.bytes -= old as u64;
        }
    }

    fn has(&self, chunk: &ChunkRecord) -> bool {
        self.chunks.get(&chunk.compressed_offset) == Some(&chunk.compressed_size)
    }

    /// Reads what was appended to the index file since the last read.
    fn read_index_tail(&mut self) -> io::Result<()> {
        let Some(files) = &self.files else { return Ok(()) };
        let index = files.index.clone();
        let len = index.metadata()?.len();
        if len <= self.index_read_to {
            return Ok(());
        }
        let mut buf = vec![0u8; (len - self.index_read_to).min(MAX_INDEX_BYTES) as usize];
        let mut have = 0;
        while have < buf.len() {
            match index.read_at(&mut buf[have..], self.index_read_to + have as u64)? {
                0 => break,
                n => have += n,
            }
        }
        buf.truncate(have);
        let (records, consumed) = parse_records(&buf);
        for r in records {
            self.insert(r);
        }
        self.index_read_to += consumed as u64;
        Ok(())
    }
}

/// A backing file this daemon knows is in `<dir>/files`.
#[derive(Debug, Clone, Copy)]
struct CachedFile {
    bytes: u64,
    last_use: SystemTime,
}

/// A chunk waiting for the writer, served from here until it is on disk.
struct QueuedChunk {
    digest: ChunkDigest,
    data: Arc<Vec<u8>>,
    /// Stored plus decoded bytes, what it counts against the queue's bound.
    bytes: u64,
}

#[derive(Default)]
struct WriteQueue {
    chunks: HashMap<(BlobSha256, u64), QueuedChunk>,
    bytes: u64,
}

struct Shared {
    /// `<dir>/blobs`.
    blobs_dir: PathBuf,
    capacity: u64,
    /// Queued bytes beyond which `put` waits ([`WRITE_QUEUE_BYTES`]).
    queue_limit: u64,
    index: Mutex<HashMap<BlobSha256, CachedBlob>>,
    /// `<dir>/files`.
    files_dir: PathBuf,
    /// The backing files, by key. Locked after `index` when both are.
    files: Mutex<HashMap<BlobSha256, CachedFile>>,
    counters: Arc<Counters>,
    queue: Mutex<WriteQueue>,
    /// Signalled whenever the writer takes a chunk off the queue.
    queue_drained: Condvar,
    writer_alive: AtomicBool,
}

enum Job {
    Put { blob: BlobSha256, offset: u64, stored: Vec<u8> },
    Flush(mpsc::SyncSender<()>),
}

/// The on-disk chunk cache of one daemon (several daemons may share a
/// directory; each keeps its own view of what is there).
pub struct DiskCache {
    shared: Arc<Shared>,
    jobs: Mutex<Option<Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn remove_if_present(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != ErrorKind::NotFound {
            tracing::warn!("disk cache: cannot remove {}: {e}", path.display());
        }
    }
}

fn mtime(meta: &fs::Metadata) -> SystemTime {
    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Shared {
    fn data_path(&self, blob: &BlobSha256) -> PathBuf {
        self.blobs_dir.join(format!("{}.data", hex(blob)))
    }

    fn index_path(&self, blob: &BlobSha256) -> PathBuf {
        self.blobs_dir.join(format!("{}.index", hex(blob)))
    }

    /// The entry of `blob` with its files open (created if `create`), its
    /// index read. `Ok(None)`: the files do not exist and `create` is false.
    fn open_blob<'a>(&self, index: &'a mut HashMap<BlobSha256, CachedBlob>, blob: &BlobSha256, create: bool) -> io::Result<Option<&'a mut CachedBlob>> {
        if index.get(blob).is_none_or(|b| b.files.is_none()) {
            let open = || -> io::Result<(File, File)> {
                // .data first: an index never names a data file that is not there yet.
                let data_path = self.data_path(blob);
                // Never through a link planted in the cache directory.
                let rw = || OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).clone();
                let (data, created) = match rw().open(&data_path) {
                    Ok(f) => (f, false),
                    Err(e) if e.kind() == ErrorKind::NotFound && create => match rw().create_new(true).open(&data_path) {
                        Ok(f) => (f, true),
                        Err(e) if e.kind() == ErrorKind::AlreadyExists => (rw().open(&data_path)?, false),
                        Err(e) => return Err(e),
                    },
                    Err(e) => return Err(e),
                };
                let idx = OpenOptions::new().read(true).append(true).create(create).custom_flags(libc::O_NOFOLLOW).open(self.index_path(blob))?;
                if created && idx.metadata()?.len() > 0 {
                    // Records left without their data file name nothing.
                    idx.set_len(0)?;
                }
                Ok((data, idx))
            };
            let opened = match open() {
                Err(e) if e.kind() == ErrorKind::NotFound && create => {
                    fs::create_dir_all(&self.blobs_dir)?;
                    open()
                }
                other => other,
            };
            let (data, idx) = match opened {
                Ok(files) => files,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    // Gone (evicted by another daemon) or never there.
                    index.remove(blob);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let meta = idx.metadata()?;
            let id = (meta.dev(), meta.ino());
            let entry = index.entry(*blob).or_insert_with(|| CachedBlob::new(SystemTime::now()));
            if entry.index_id != Some(id) {
                // Not the index file read at open (replaced since): start over.
                *entry = CachedBlob { index_id: Some(id), ..CachedBlob::new(entry.last_use) };
            }
            entry.files = Some(BlobFiles { data: Arc::new(data), index: Arc::new(idx), mtime_refreshed: None });
            entry.read_index_tail()?;
        }
        Ok(index.get_mut(blob))
    }

    /// Evicts least recently used blobs (other than `keep`) and backing
    /// files until `need` more bytes fit under the cap; false if they cannot.
    fn make_room(&self, index: &mut HashMap<BlobSha256, CachedBlob>, keep: Option<&BlobSha256>, need: u64) -> bool {
        let mut files = lock(&self.files);
        loop {
            let total: u64 = index.values().map(|b| b.bytes).sum::<u64>() + files.values().map(|f| f.bytes).sum::<u64>();
            if total.saturating_add(need) <= self.capacity {
                return true;
            }
            let blob = index.iter().filter(|(k, b)| Some(*k) != keep && b.bytes > 0).min_by_key(|(k, b)| (b.last_use, **k)).map(|(k, b)| (*k, b.last_use));
            let file = files.iter().min_by_key(|(k, f)| (f.last_use, **k)).map(|(k, f)| (*k, f.last_use));
            match (blob, file) {
                (None, None) => return false,
                (Some((_, b)), Some((key, f))) if f <= b => self.evict_file(&mut files, &key),
                (None, Some((key, _))) => self.evict_file(&mut files, &key),
                (Some((victim, _)), _) => {
                    if let Some(gone) = index.remove(&victim) {
                        // Removed under the index lock, so no lookup reopens them
                        // in between; whoever has them open keeps reading them.
                        // The index first: data without an index is merely unused.
                        remove_if_present(&self.index_path(&victim));
                        remove_if_present(&self.data_path(&victim));
                        add(&self.counters.disk_evictions, gone.chunks.len() as u64);
                        tracing::debug!("disk cache: evicted blob {} ({} chunks, {} bytes)", hex(&victim), gone.chunks.len(), gone.bytes);
                    }
                }
            }
        }
    }

    fn file_path(&self, key: &BlobSha256) -> PathBuf {
        self.files_dir.join(hex(key))
    }

    /// Removes a backing file and its marker (open descriptors and the
    /// kernel's passthrough references keep working).
    fn evict_file(&self, files: &mut HashMap<BlobSha256, CachedFile>, key: &BlobSha256) {
        if let Some(gone) = files.remove(key) {
            remove_marked(&self.file_path(key));
            inc(&self.counters.backing_evictions);
            tracing::debug!("disk cache: evicted backing file {} ({} bytes)", hex(key), gone.bytes);
        }
    }

    /// Indexes the backing files on disk; removes temporary files and
    /// markers left by crashed writers.
    fn scan_files(&self) -> io::Result<HashMap<BlobSha256, CachedFile>> {
        let mut found = HashMap::new();
        let entries = match fs::read_dir(&self.files_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e),
        };
        let now = SystemTime::now();
        let mut markers = Vec::new();
        for e in entries {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            match parse_hex32(name) {
                Some(key) => {
                    found.insert(key, CachedFile { bytes: meta.len(), last_use: mtime(&meta) });
                }
                _ if name.ends_with(naiad_registry::verified_file::MARKER_SUFFIX) => markers.push(e.path()),
                _ if now.duration_since(mtime(&meta)).unwrap_or_default() > ORPHAN_AGE => remove_if_present(&e.path()),
                _ => {}
            }
        }
        for m in markers {
            let data = m.with_extension("");
            if !data.exists() {
                remove_if_present(&m);
            }
        }
        Ok(found)
    }

    /// Writes one chunk's stored bytes and its index record.
    fn write(&self, blob: &BlobSha256, offset: u64, stored: &[u8]) {
        let Ok(size) = u32::try_from(stored.len()) else { return };
        let record = IndexRecord { offset, size };
        let files = {
            let mut index = lock(&self.index);
            if index.get(blob).is_some_and(|b| b.chunks.get(&offset) == Some(&size)) {
                return;
            }
            // Files another daemon evicted (unlinked) would take space no
            // cap counts until closed: forget them, and write new ones.
            if index.get(blob).and_then(|b| b.files.as_ref()).is_some_and(|f| f.data.metadata().map(|m| m.nlink() == 0).unwrap_or(true)) {
                tracing::debug!("disk cache: blob {} was evicted by another daemon; starting its files again", hex(blob));
                index.remove(blob);
            }
            if !self.make_room(&mut index, Some(blob), size as u64) {
                tracing::debug!("disk cache: blob {} alone fills the cache; not caching more of it", hex(blob));
                return;
            }
            match self.open_blob(&mut index, blob, true) {
                Ok(Some(b)) => match &b.files {
                    Some(f) => (f.data.clone(), f.index.clone()),
                    None => return,
                },
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("disk cache: cannot open the files of blob {} in {}: {e}", hex(blob), self.blobs_dir.display());
                    return;
                }
            }
        };
        let (data, idx) = files;
        if let Err(e) = data.write_all_at(stored, offset) {
            tracing::warn!("disk cache: cannot write {}: {e}", self.data_path(blob).display());
            return;
        }
        // One write() per record, so records of concurrent writers never mix.
        match (&*idx).write(&encode_record(record)) {
            Ok(RECORD_SIZE) => {}
            Ok(n) => {
                tracing::warn!("disk cache: short write ({n} of {RECORD_SIZE} bytes) to {}", self.index_path(blob).display());
                return;
            }
            Err(e) => {
                tracing::warn!("disk cache: cannot append to {}: {e}", self.index_path(blob).display());
                return;
            }
        }
        inc(&self.counters.disk_writes);
        let mut index = lock(&self.index);
        if let Some(b) = index.get_mut(blob) {
            b.insert(record);
            b.last_use = SystemTime::now();
        }
    }

    /// Indexes what is on disk, removes leftovers and evicts down to the cap.
    fn scan(&self) -> Result<(), StorageError> {
        let now = SystemTime::now();
        let mut data_files: HashMap<BlobSha256, fs::Metadata> = HashMap::new();
        let mut index_files: Vec<(BlobSha256, fs::Metadata)> = Vec::new();
        for e in fs::read_dir(&self.blobs_dir).at(&self.blobs_dir)? {
            let e = e.at(&self.blobs_dir)?;
            let name = e.file_name();
            let Some((blob, ext)) = name.to_str().and_then(parse_blob_file_name) else { continue };
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            match ext {
                "data" => {
                    data_files.insert(blob, meta);
                }
                "index" => index_files.push((blob, meta)),
                _ => {}
            }
        }
        let old = |meta: &fs::Metadata| now.duration_since(mtime(meta)).unwrap_or_default() > ORPHAN_AGE;
        let mut found = HashMap::new();
        for (blob, meta) in index_files {
            let index_path = self.index_path(&blob);
            let Some(data_meta) = data_files.remove(&blob) else {
                if old(&meta) {
                    remove_if_present(&index_path);
                }
                continue;
            };
            if meta.len() > MAX_INDEX_BYTES {
                tracing::warn!("disk cache: {} is {} bytes, too large to be an index; removing the blob", index_path.display(), meta.len());
                remove_if_present(&self.data_path(&blob));
                remove_if_present(&index_path);
                continue;
            }
            let bytes = match fs::read(&index_path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("disk cache: cannot read {}: {e}", index_path.display());
                    continue;
                }
            };
            let mut b = CachedBlob::new(mtime(&data_meta).max(mtime(&meta)));
            b.index_id = Some((meta.dev(), meta.ino()));
            let (records, consumed) = parse_records(&bytes);
            for r in records {
                b.insert(r);
            }
            b.index_read_to = consumed as u64;
            found.insert(blob, b);
        }
        for (blob, meta) in data_files {
            if old(&meta) {
                remove_if_present(&self.data_path(&blob));
            }
        }
        let files = self.scan_files().at(&self.files_dir)?;
        let mut index = lock(&self.index);
        *index = found;
        *lock(&self.files) = files;
        self.make_room(&mut index, None, 0);
        Ok(())
    }

    /// Forgets a chunk that did not verify (a later write replaces it).
    fn forget(&self, blob: &BlobSha256, offset: u64) {
        if let Some(b) = lock(&self.index).get_mut(blob) {
            b.remove(offset);
        }
    }

    /// Marks a blob used now; refreshes its mtime if that is due.
    fn touch(&self, blob: &BlobSha256) {
        let now = SystemTime::now();
        let refresh = {
            let mut index = lock(&self.index);
            let Some(b) = index.get_mut(blob) else { return };
            b.last_use = now;
            match &mut b.files {
                Some(f) if f.mtime_refreshed.is_none_or(|t| t.elapsed() >= MTIME_REFRESH) => {
                    f.mtime_refreshed = Some(Instant::now());
                    Some(f.data.clone())
                }
                _ => None,
            }
        };
        if let Some(data) = refresh {
            if let Err(e) = data.set_modified(now) {
                tracing::debug!("disk cache: cannot refresh the mtime of {}: {e}", self.data_path(blob).display());
            }
        }
    }
}

/// Sets `writer_alive` to false when the writer ends, even by a panic.
struct WriterAlive(Arc<Shared>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.writer_alive.store(false, Ordering::SeqCst);
        self.0.queue_drained.notify_all();
    }
}

fn writer_loop(shared: Arc<Shared>, jobs: Receiver<Job>, old_layout: PathBuf) {
    let _alive = WriterAlive(shared.clone());
    if old_layout.is_dir() {
        tracing::info!("disk cache: removing the old per-chunk cache {}", old_layout.display());
        if let Err(e) = fs::remove_dir_all(&old_layout) {
            tracing::warn!("disk cache: cannot remove {}: {e}", old_layout.display());
        }
    }
    for job in jobs {
        match job {
            Job::Put { blob, offset, stored } => {
                shared.write(&blob, offset, &stored);
                let mut q = lock(&shared.queue);
                if let Some(done) = q.chunks.remove(&(blob, offset)) {
                    q.bytes -= done.bytes;
                }
                drop(q);
                shared.queue_drained.notify_all();
            }
            Job::Flush(ack) => {
                let _ = ack.send(());
            }
        }
    }
}

impl DiskCache {
    /// Opens (creating if needed) the cache under `dir`, capped at
    /// `capacity` stored bytes, and indexes what earlier runs left there.
    pub fn open(dir: &Path, capacity: u64, counters: Arc<Counters>) -> Result<Self, StorageError> {
        Self::open_with_queue_limit(dir, capacity, counters, WRITE_QUEUE_BYTES)
    }

    fn open_with_queue_limit(dir: &Path, capacity: u64, counters: Arc<Counters>, queue_limit: u64) -> Result<Self, StorageError> {
        let blobs_dir = dir.join(BLOBS_DIR);
        fs::create_dir_all(&blobs_dir).at(&blobs_dir)?;
        let shared = Arc::new(Shared {
            blobs_dir,
            capacity,
            queue_limit,
            index: Mutex::new(HashMap::new()),
            files_dir: dir.join(FILES_DIR),
            files: Mutex::new(HashMap::new()),
            counters,
            queue: Mutex::new(WriteQueue::default()),
            queue_drained: Condvar::new(),
            writer_alive: AtomicBool::new(true),
        });
        shared.scan()?;
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        let old_layout = dir.join(OLD_CHUNKS_DIR);
        let writer = std::thread::Builder::new().name("naiad-cache-writer".into()).spawn(move || writer_loop(s, rx, old_layout)).at(dir)?;
        Ok(DiskCache { shared, jobs: Mutex::new(Some(tx)), writer: Mutex::new(Some(writer)) })
    }

    /// Whether the cache under `dir` has records of any chunk of `blob`
    /// (its index file is not empty), without opening the cache: one
    /// `stat`, for a decision to be made before the cache is scanned.
    pub fn holds_any_of(dir: &Path, blob: &BlobSha256) -> bool {
        fs::metadata(dir.join(BLOBS_DIR).join(format!("{}.index", hex(blob)))).is_ok_and(|m| m.len() > 0)
    }

    /// Whether the cache has (or is writing) `chunk` of `blob`, as far as
    /// this daemon knows; [`DiskCache::get`] still verifies it.
    pub fn contains(&self, blob: &BlobSha256, chunk: &ChunkRecord) -> bool {
        let queued = lock(&self.shared.queue).chunks.contains_key(&(*blob, chunk.compressed_offset));
        queued || lock(&self.shared.index).get(blob).is_some_and(|b| b.has(chunk))
    }

    /// The verified, decompressed bytes of `chunk` of `blob`, if the cache
    /// has a good copy. A copy that fails to read or verify is counted,
    /// forgotten and not served.
    pub fn get(&self, blob: &BlobSha256, chunk: &ChunkRecord) -> Option<Arc<Vec<u8>>> {
        let s = &self.shared;
        if let Some(q) = lock(&s.queue).chunks.get(&(*blob, chunk.compressed_offset)) {
            if q.digest == chunk.digest {
                return Some(q.data.clone());
            }
        }
        let data_file = {
            let mut index = lock(&s.index);
            let b = match s.open_blob(&mut index, blob, false) {
                Ok(Some(b)) => b,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!("disk cache: cannot open the files of blob {} in {}: {e}", hex(blob), s.blobs_dir.display());
                    return None;
                }
            };
            if !b.chunks.contains_key(&chunk.compressed_offset) {
                // Another daemon may have written it since we last looked.
                if let Err(e) = b.read_index_tail() {
                    tracing::warn!("disk cache: cannot read {}: {e}", s.index_path(blob).display());
                }
            }
            if !b.has(chunk) {
                return None;
            }
            b.files.as_ref()?.data.clone()
        };
        let mut stored = vec![0u8; chunk.compressed_size as usize];
        let decoded =
            data_file.read_exact_at(&mut stored, chunk.compressed_offset).map_err(|e| e.to_string()).and_then(|()| decode_chunk(&stored, chunk).map_err(|e| e.to_string()));
        match decoded {
            Ok(data) => {
                s.touch(blob);
                Some(Arc::new(data))
            }
            Err(e) => {
                tracing::warn!("disk cache: chunk {} at offset {} of {}: {e}; dropping it", hex(&chunk.digest), chunk.compressed_offset, s.data_path(blob).display());
                inc(&s.counters.disk_corrupt);
                s.forget(blob, chunk.compressed_offset);
                None
            }
        }
    }

    /// Queues `chunk` of `blob` to be written: `stored` its bytes as in the
    /// blob, `data` the verified decoded bytes (served until it is written).
    /// Waits only if more than [`WRITE_QUEUE_BYTES`] are queued already.
    pub fn put(&self, blob: BlobSha256, chunk: &ChunkRecord, stored: Vec<u8>, data: Arc<Vec<u8>>) {
        let s = &self.shared;
        if stored.len() != chunk.compressed_size as usize || stored.len() as u64 > s.capacity {
            return;
        }
        if lock(&s.index).get(&blob).is_some_and(|b| b.has(chunk)) {
            return;
        }
        let key = (blob, chunk.compressed_offset);
        let bytes = (stored.len() + data.len()) as u64;
        let Some(jobs) = lock(&self.jobs).clone() else { return };
        let mut q = lock(&s.queue);
        loop {
            if q.chunks.contains_key(&key) {
                return;
            }
            if q.bytes == 0 || q.bytes + bytes <= s.queue_limit {
                break;
            }
            if !s.writer_alive.load(Ordering::SeqCst) {
                return;
            }
            q = s.queue_drained.wait_timeout(q, Duration::from_millis(100)).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        q.chunks.insert(key, QueuedChunk { digest: chunk.digest, data, bytes });
        q.bytes += bytes;
        drop(q);
        if jobs.send(Job::Put { blob, offset: chunk.compressed_offset, stored }).is_err() {
            let mut q = lock(&s.queue);
            if let Some(gone) = q.chunks.remove(&key) {
                q.bytes -= gone.bytes;
            }
            tracing::debug!("disk cache: writer gone, not caching {}", hex(&chunk.digest));
        }
    }

    /// Waits until every queued write is on disk.
    pub fn flush(&self) {
        let jobs = lock(&self.jobs).clone();
        if let Some(jobs) = jobs {
            let (tx, rx) = mpsc::sync_channel(1);
            if jobs.send(Job::Flush(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
    }

    /// (bytes held, chunks held) as this daemon knows them; the bytes are
    /// the chunks' stored bytes plus the backing files'.
    pub fn usage(&self) -> (u64, u64) {
        let index = lock(&self.shared.index);
        let (bytes, chunks) = index.values().fold((0, 0), |(bytes, chunks), b| (bytes + b.bytes, chunks + b.chunks.len() as u64));
        (bytes + lock(&self.shared.files).values().map(|f| f.bytes).sum::<u64>(), chunks)
    }

    /// The directory of the backing files (`<dir>/files`), created if needed.
    pub fn files_dir(&self) -> io::Result<&Path> {
        fs::create_dir_all(&self.shared.files_dir)?;
        Ok(&self.shared.files_dir)
    }

    /// The path backing file `key` has (or would have).
    pub fn backing_file_path(&self, key: &BlobSha256) -> PathBuf {
        self.shared.file_path(key)
    }

    /// Whether backing file `key` is known, or was written by another
    /// daemon since this one looked (then it is indexed now).
    pub fn has_backing_file(&self, key: &BlobSha256) -> bool {
        if lock(&self.shared.files).contains_key(key) {
            return true;
        }
        match fs::symlink_metadata(self.shared.file_path(key)) {
            Ok(meta) if meta.is_file() => {
                lock(&self.shared.files).insert(*key, CachedFile { bytes: meta.len(), last_use: SystemTime::now() });
                true
            }
            _ => false,
        }
    }

    /// Makes room for a new backing file of `bytes` and counts it; false
    /// (nothing counted) if it cannot fit under the cap.
    pub fn admit_backing_file(&self, key: &BlobSha256, bytes: u64) -> bool {
        let s = &self.shared;
        let mut index = lock(&s.index);
        if lock(&s.files).contains_key(key) {
            return true;
        }
        if bytes > s.capacity || !s.make_room(&mut index, None, bytes) {
            return false;
        }
        lock(&s.files).insert(*key, CachedFile { bytes, last_use: SystemTime::now() });
        true
    }

    /// Marks backing file `key` used now.
    pub fn touch_backing_file(&self, key: &BlobSha256) {
        if let Some(f) = lock(&self.shared.files).get_mut(key) {
            f.last_use = SystemTime::now();
        }
    }

    /// Removes backing file `key` (it failed verification, or its write did).
    pub fn remove_backing_file(&self, key: &BlobSha256) {
        lock(&self.shared.files).remove(key);
        remove_marked(&self.shared.file_path(key));
    }

    pub fn capacity(&self) -> u64 {
        self.shared.capacity
    }

    /// The directory holding the blob files (`<dir>/blobs`).
    pub fn dir(&self) -> &Path {
        &self.shared.blobs_dir
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it has drained it.
        lock(&self.jobs).take();
        if let Some(t) = lock(&self.writer).take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use naiad_format::encode_chunk;

    /// A blob of `chunks` chunks (compressible ones stored as zstd), laid
    /// out one after another from `base`: (records, stored bytes, data).
    fn blob_chunks(seed: u8, count: usize, base: u64) -> Vec<(ChunkRecord, Vec<u8>, Vec<u8>)> {
        let mut offset = base;
        (0..count)
            .map(|i| {
                let data: Vec<u8> = (0..1000u32).map(|j| if i % 2 == 0 { seed } else { (j as u8).wrapping_mul(seed).wrapping_add(i as u8) ^ (j >> 3) as u8 }).collect();
                let enc = encode_chunk(&data, 3);
                let rec = ChunkRecord {
                    digest: enc.digest,
                    blob_index: 0,
                    compressed_offset: offset,
                    compressed_size: enc.stored.len() as u32,
                    uncompressed_size: enc.uncompressed_size,
                };
                offset += enc.stored.len() as u64 + 7;
                (rec, enc.stored, data)
            })
            .collect()
    }

    fn put(cache: &DiskCache, blob: BlobSha256, c: &(ChunkRecord, Vec<u8>, Vec<u8>)) {
        cache.put(blob, &c.0, c.1.clone(), Arc::new(c.2.clone()));
    }

    const A: BlobSha256 = [0xaa; 32];
    const B: BlobSha256 = [0xbb; 32];
    const C: BlobSha256 = [0xcc; 32];

    #[test]
    fn whether_a_blob_has_records_is_known_without_opening_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!DiskCache::holds_any_of(dir.path(), &A), "no cache yet");
        let cache = DiskCache::open(dir.path(), 1 << 20, Arc::new(Counters::default())).unwrap();
        put(&cache, A, &blob_chunks(1, 1, 0)[0]);
        cache.flush();
        assert!(DiskCache::holds_any_of(dir.path(), &A));
        assert!(!DiskCache::holds_any_of(dir.path(), &B), "nothing of another blob");
    }

    #[test]
    fn persists_verifies_and_evicts_whole_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let counters = Arc::new(Counters::default());
        let a = blob_chunks(1, 4, 100);
        let b = blob_chunks(2, 4, 0);
        let c = blob_chunks(3, 4, 50);
        assert!(a.iter().any(|c| c.0.is_zstd()) && a.iter().any(|c| !c.0.is_zstd()));
        let size = |v: &[(ChunkRecord, Vec<u8>, Vec<u8>)]| v.iter().map(|c| c.1.len() as u64).sum::<u64>();
        let cap = size(&a) + size(&b) + size(&c) - 1;
        {
            let cache = DiskCache::open(dir.path(), cap, counters.clone()).unwrap();
            assert!(cache.get(&A, &a[0].0).is_none());
            for x in &a {
                put(&cache, A, x);
            }
            // Served from the queue or from disk, never missing.
            assert_eq!(*cache.get(&A, &a[1].0).unwrap(), a[1].2);
            for x in &b {
                put(&cache, B, x);
            }
            cache.flush();
            assert_eq!(counters.snapshot().disk_writes, 8);
            // The stored bytes sit at their offsets of a sparse file.
            let file = fs::read(cache.shared.data_path(&A)).unwrap();
            for x in &a {
                let at = x.0.compressed_offset as usize;
                assert_eq!(&file[at..at + x.1.len()], &x.1[..]);
            }
            assert_eq!(fs::metadata(cache.shared.index_path(&A)).unwrap().len(), 4 * RECORD_SIZE as u64);
            for x in &a {
                assert_eq!(*cache.get(&A, &x.0).unwrap(), x.2);
            }
            // The same chunk (same blob and offset) is written once.
            put(&cache, A, &a[0]);
            for x in &c {
                put(&cache, C, x);
            }
            cache.flush();
            assert_eq!(counters.snapshot().disk_writes, 12);
            // B was the least recently used blob: it went as a whole.
            assert!(!cache.contains(&B, &b[0].0) && cache.get(&B, &b[3].0).is_none());
            assert!(!cache.shared.data_path(&B).exists() && !cache.shared.index_path(&B).exists());
            assert_eq!(cache.usage(), (size(&a) + size(&c), 8));
        }
        assert_eq!(counters.snapshot().disk_evictions, 4);
        assert_eq!(counters.snapshot().disk_hits, 0, "hits are the chunk cache's to count");

        // A new instance finds what the old one left.
        let counters = Arc::new(Counters::default());
        let cache = DiskCache::open(dir.path(), cap, counters.clone()).unwrap();
        assert_eq!(cache.usage(), (size(&a) + size(&c), 8));
        assert!(cache.contains(&C, &c[2].0));
        assert_eq!(*cache.get(&C, &c[2].0).unwrap(), c[2].2);
        // A record with the wrong size for the chunk is not a hit.
        let mut wrong = c[2].0;
        wrong.compressed_size += 1;
        assert!(!cache.contains(&C, &wrong) && cache.get(&C, &wrong).is_none());

        // A damaged chunk is dropped, not served; its neighbours are fine.
        let data_path = cache.shared.data_path(&A);
        let mut bytes = fs::read(&data_path).unwrap();
        bytes[a[1].0.compressed_offset as usize + 3] ^= 1;
        fs::write(&data_path, &bytes).unwrap();
        assert!(cache.get(&A, &a[1].0).is_none());
        assert_eq!(counters.snapshot().disk_corrupt, 1);
        assert!(!cache.contains(&A, &a[1].0));
        assert_eq!(*cache.get(&A, &a[2].0).unwrap(), a[2].2);
        // A truncated data file too.
        let f = OpenOptions::new().write(true).open(&data_path).unwrap();
        f.set_len(a[3].0.compressed_offset + 2).unwrap();
        assert!(cache.get(&A, &a[3].0).is_none());
        assert_eq!(counters.snapshot().disk_corrupt, 2);
        // Written again, the good copy replaces the bad one.
        put(&cache, A, &a[1]);
        cache.flush();
        assert_eq!(*cache.get(&A, &a[1].0).unwrap(), a[1].2);
        assert_eq!(cache.usage().1, 7);
    }

    #[test]
    fn writes_after_another_daemon_evicted_go_to_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = blob_chunks(6, 3, 0);
        let first = DiskCache::open(dir.path(), 1 << 20, Arc::new(Counters::default())).unwrap();
        put(&first, A, &a[0]);
        first.flush();
        // Another daemon evicts the blob: both files unlinked.
        let data = first.shared.data_path(&A);
        fs::remove_file(&data).unwrap();
        fs::remove_file(first.shared.index_path(&A)).unwrap();
        put(&first, A, &a[1]);
        first.flush();
        // The write went to a new, linked file, which a new cache sees.
        assert!(data.exists(), "written into the unlinked file");
        let second = DiskCache::open(dir.path(), 1 << 20, Arc::new(Counters::default())).unwrap();
        assert_eq!(*second.get(&A, &a[1].0).unwrap(), a[1].2);
    }

    #[test]
    fn links_planted_in_the_cache_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let a = blob_chunks(7, 1, 0);
        let cache = DiskCache::open(dir.path(), 1 << 20, Arc::new(Counters::default())).unwrap();
        fs::create_dir_all(&cache.shared.blobs_dir).unwrap();
        std::os::unix::fs::symlink(&victim, cache.shared.data_path(&A)).unwrap();
        put(&cache, A, &a[0]);
        cache.flush();
        assert_eq!(fs::read(&victim).unwrap(), b"keep", "the cache wrote through a symlink");
    }

    #[test]
    fn two_caches_on_one_directory_see_each_others_writes() {
        let dir = tempfile::tempdir().unwrap();
        let a = blob_chunks(5, 3, 0);
        let first = DiskCache::open(dir.path(), 1 << 20, Arc::new(Counters::default())).unwrap();
        let second = DiskCache::open(dir.path(), 1 << 20, Arc::new(Counters::default())).unwrap();
        put(&first, A, &a[0]);
        first.flush();
        // The blob is new to `second`: found on a lookup.
        assert_eq!(*second.get(&A, &a[0].0).unwrap(), a[0].2);
        // Now known: further chunks come from its index file's tail.
        put(&first, A, &a[1]);
        first.flush();
        assert_eq!(*second.get(&A, &a[1].0).unwrap(), a[1].2);
        // Both write the same chunk: identical bytes, both can read it.
        put(&second, A, &a[2]);
        put(&first, A, &a[2]);
        second.flush();
        first.flush();
        assert_eq!(*first.get(&A, &a[2].0).unwrap(), a[2].2);
        assert_eq!(*second.get(&A, &a[2].0).unwrap(), a[2].2);
        drop((first, second));
        let third = DiskCache::open(dir.path(), 1 << 20, Arc::new(Counters::default())).unwrap();
        assert_eq!(third.usage().1, 3);
    }

    #[test]
    fn torn_and_foreign_index_records_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let a = blob_chunks(7, 3, 0);
        {
            let cache = DiskCache::open(dir.path(), 1 << 20, Arc::new(Counters::default())).unwrap();
            put(&cache, A, &a[0]);
            cache.flush();
            // A crash in the middle of appending a record, then a record
            // naming a chunk that is not in the data file.
            let mut idx = OpenOptions::new().append(true).open(cache.shared.index_path(&A)).unwrap();
            idx.write_all(&encode_record(IndexRecord { offset: a[1].0.compressed_offset, size: a[1].0.compressed_size })[..11]).unwrap();
            put(&cache, A, &a[2]);
            cache.flush();
            idx.write_all(&encode_record(IndexRecord { offset: a[1].0.compressed_offset, size: a[1].0.compressed_size })).unwrap();
        }
        let counters = Arc::new(Counters::default());
        let cache = DiskCache::open(dir.path(), 1 << 20, counters.clone()).unwrap();
        assert_eq!(cache.usage().1, 3);
        assert_eq!(*cache.get(&A, &a[0].0).unwrap(), a[0].2);
        assert_eq!(*cache.get(&A, &a[2].0).unwrap(), a[2].2);
        // The record is there, the bytes are not (a hole or past the end).
        assert!(cache.get(&A, &a[1].0).is_none());
        assert_eq!(counters.snapshot().disk_corrupt, 1);
    }

    #[test]
    fn an_index_left_without_its_data_file_is_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let a = blob_chunks(9, 2, 0);
        let cache = DiskCache::open(dir.path(), 1 << 20, Arc::new(Counters::default())).unwrap();
        put(&cache, A, &a[0]);
        cache.flush();
        let (data_path, index_path) = (cache.shared.data_path(&A), cache.shared.index_path(&A));
        drop(cache);
        fs::remove_file(&data_path).unwrap();
        let counters = Arc::new(Counters::default());
        let cache = DiskCache::open(dir.path(), 1 << 20, counters.clone()).unwrap();
        assert_eq!(cache.usage(), (0, 0));
        assert!(cache.get(&A, &a[0].0).is_none());
        put(&cache, A, &a[1]);
        cache.flush();
        // The new data file came with an empty index: only a[1] is named.
        assert_eq!(fs::metadata(&index_path).unwrap().len(), RECORD_SIZE as u64);
        assert!(cache.get(&A, &a[0].0).is_none());
        assert_eq!(*cache.get(&A, &a[1].0).unwrap(), a[1].2);
        assert_eq!(counters.snapshot().disk_corrupt, 0);
    }

    #[test]
    fn records_and_names_round_trip() {
        let r = IndexRecord { offset: 0x0123_4567_89ab, size: 77 };
        let bytes = encode_record(r);
        assert_eq!(decode_record(&bytes), Some(r));
        let mut bad = bytes;
        bad[6] ^= 1;
        assert_eq!(decode_record(&bad), None);
        let mut buf = vec![9u8; 5];
        buf.extend_from_slice(&bytes);
        buf.extend_from_slice(&bytes[..7]);
        let (records, consumed) = parse_records(&buf);
        assert_eq!(records, vec![r]);
        assert_eq!(consumed, 5 + RECORD_SIZE);
        // The tail is read again next time: it may still be growing.
        let (records, consumed) = parse_records(&[0u8; 100]);
        assert!(records.is_empty());
        assert_eq!(consumed, 100 - 2 * RECORD_SIZE);

        let d = [0xabu8; 32];
        assert_eq!(parse_blob_file_name(&format!("{}.data", hex(&d))), Some((d, "data")));
        assert_eq!(parse_blob_file_name(&format!("{}.index", hex(&d).to_uppercase())), None);
        assert_eq!(parse_blob_file_name("xyz.data"), None);
        assert_eq!(parse_blob_file_name(&format!("{}.data", "g".repeat(64))), None);
    }

    #[test]
    fn old_per_chunk_layout_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("chunks/ab");
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join("x"), b"old").unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20, Arc::new(Counters::default())).unwrap();
        cache.flush();
        assert!(!dir.path().join("chunks").exists());
    }

    #[test]
    fn a_full_queue_makes_writers_wait_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 1 << 20;
        let cache = DiskCache::open_with_queue_limit(dir.path(), 1 << 30, Arc::new(Counters::default()), limit).unwrap();
        // Far more than the queue holds, from two threads.
        let chunk_bytes = 64u64 << 10;
        let count = 40u64;
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let cache = &cache;
                s.spawn(move || {
                    for i in 0..count {
                        let data = vec![(t * 7 + i) as u8; chunk_bytes as usize];
                        let rec = ChunkRecord {
                            digest: *blake3::hash(&data).as_bytes(),
                            blob_index: 0,
                            compressed_offset: (t * count + i) * chunk_bytes,
                            compressed_size: chunk_bytes as u32,
                            uncompressed_size: chunk_bytes as u32,
                        };
                        cache.put(A, &rec, data.clone(), Arc::new(data));
                        assert!(lock(&cache.shared.queue).bytes <= limit);
                    }
                });
            }
        });
        cache.flush();
        assert_eq!(cache.usage(), (2 * count * chunk_bytes, 2 * count));
        assert_eq!(lock(&cache.shared.queue).bytes, 0);
    }
}
