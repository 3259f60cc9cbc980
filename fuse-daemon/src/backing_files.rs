//! [`BackingFiles`]: whole files, uncompressed, in the cache.
//!
//! Once every chunk of a regular file of [`MIN_BACKING_SIZE`] or more is
//! local (memory or disk cache), the file is assembled once from those
//! verified chunks into `<cache>/files/<key>`, where `key` is [`file_key`]:
//! the blake3 of the file's size and chunk list. Identical files of any
//! image share one backing file.
//!
//! A backing file is written to a temporary name, fsync'd, renamed into
//! place, and only then given its *marker* (`<key>.ok`, see
//! [`naiad_registry::verified_file`]): the key, and the inode number, size
//! and ctime the data file had after the rename. A later open trusts the
//! file only if its marker matches what `fstat` says now. Anything that wrote to the file
//! since (or replaced it) changed its ctime, so the file is verified again
//! chunk by chunk against the bootstrap's digests; one that fails is
//! counted in `backing_corrupt`, removed, and assembled again from the
//! chunk cache (which refetches what it lacks). A file whose write did not
//! finish has no marker and is never used.
//!
//! Reads of a file that has a backing file are served from it
//! ([`BackingFiles::reader`]: an open descriptor per inode, kept in a
//! bounded LRU along with "has none" answers), with no decompression and
//! no verification beyond the marker check at first use; with
//! `--passthrough` the kernel reads it itself.
//!
//! Assembly happens on one background thread: [`BackingFiles::offer`]
//! queues a file (after a read of it, or when the prefetch finished), and
//! the thread writes it if all its chunks are cached. Backing files count
//! toward the disk cache's cap and are evicted with it
//! ([`crate::disk_cache`]).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use naiad_format::bootstrap::hex;
use naiad_format::{FileChunk, InodeKind};
use naiad_reader::NaiadImage;
use naiad_registry::verified_file::{self, MarkerState};

use crate::chunk_cache::ChunkCache;
use crate::counters::inc;

/// The content address of a backing file.
pub type FileKey = [u8; 32];

/// Files smaller than this get no backing file: creating two files in the
/// cache directory costs more than decoding their one or two chunks from the
/// chunk cache (measured: on a tree of small files, file creation took half
/// the daemon's time during a cold read).
pub const MIN_BACKING_SIZE: u64 = 64 << 10;

/// The key of a file of `size` bytes made of `chunks`: blake3 over the
/// size and each chunk's offset, length and digest, in order.
pub fn file_key(size: u64, chunks: &[FileChunk]) -> FileKey {
    let mut h = blake3::Hasher::new();
    h.update(b"naiad backing file\0");
    h.update(&size.to_le_bytes());
    for c in chunks {
        h.update(&c.file_offset.to_le_bytes());
        h.update(&c.chunk.uncompressed_size.to_le_bytes());
        h.update(&c.chunk.digest);
    }
    *h.finalize().as_bytes()
}

/// Whether the chunks of `file` (opened backing file) match their digests.
fn verify_content(file: &File, size: u64, chunks: &[FileChunk]) -> Result<(), String> {
    let mut buf = Vec::new();
    let mut end = 0;
    for c in chunks {
        buf.resize(c.chunk.uncompressed_size as usize, 0);
        file.read_exact_at(&mut buf, c.file_offset).map_err(|e| format!("reading {} bytes at {}: {e}", buf.len(), c.file_offset))?;
        if blake3::hash(&buf).as_bytes() != &c.chunk.digest {
            return Err(format!("the bytes at {} do not match chunk {}", c.file_offset, hex(&c.chunk.digest)));
        }
        end = c.file_offset + buf.len() as u64;
    }
    if end != size {
        return Err(format!("the chunks end at {end}, the file at {size}"));
    }
    Ok(())
}

struct Inner {
    image: Arc<NaiadImage>,
    chunks: Arc<ChunkCache>,
    /// Inodes queued or being written.
    pending: Mutex<HashSet<u32>>,
    /// Set by [`BackingFiles::stop`]: the writer skips what is queued.
    stopping: AtomicBool,
    /// Per inode: its open backing file, or `None` (has none, as of the
    /// last look).
    readers: Mutex<lru::LruCache<u32, Option<Arc<File>>>>,
}

/// Inodes whose backing-file answer [`BackingFiles::reader`] remembers (at
/// most this many descriptors stay open; the daemon raises its descriptor
/// limit to the hard limit at start).
const READERS: usize = 1024;

/// The backing files of one mount (see the module comment).
pub struct BackingFiles {
    inner: Arc<Inner>,
    queue: Mutex<Option<Sender<u32>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// The size and chunks of regular file `ino`, if it is one worth a
    /// backing file: large, and made of whole chunks (a share of a chunk
    /// group, a small file's, could not be verified on its own).
    fn file(&self, ino: u32) -> Option<(u64, Vec<FileChunk>)> {
        let b = &self.image.bootstrap;
        let r = b.inode(ino).ok()?;
        if r.kind() != Some(InodeKind::RegularFile) || r.size < MIN_BACKING_SIZE {
            return None;
        }
        let chunks = b.file_chunks(ino).ok()?;
        chunks.iter().all(FileChunk::is_whole_chunk).then_some((r.size, chunks))
    }

    fn open(&self, ino: u32) -> Option<(File, FileKey)> {
        let disk = self.chunks.disk()?;
        let (size, chunks) = self.file(ino)?;
        let key = file_key(size, &chunks);
        if !disk.has_backing_file(&key) {
            return None;
        }
        let path = disk.backing_file_path(&key);
        let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("backing file {}: {e}", path.display());
                return None;
            }
        };
        let tag = hex(&key);
        match verified_file::check(&path, &file, &tag) {
            Ok(MarkerState::Valid) if file.metadata().is_ok_and(|m| m.len() == size) => {
                disk.touch_backing_file(&key);
                return Some((file, key));
            }
            // Not finished (or its marker was lost): never used unmarked.
            Ok(MarkerState::Missing) => return None,
            Err(e) => {
                tracing::debug!("backing file {}: {e}", path.display());
                return None;
            }
            // Changed since it was marked: verify it again.
            Ok(_) => {}
        }
        match verify_content(&file, size, &chunks).and_then(|()| verified_file::mark(&path, &tag).map_err(|e| format!("writing its marker: {e}"))) {
            Ok(()) => Some((file, key)),
            Err(e) => {
                tracing::warn!("backing file {} of inode {ino}: {e}; removing it", path.display());
                inc(&self.chunks.counters().backing_corrupt);
                disk.remove_backing_file(&key);
                None
            }
        }
    }

    /// Writes the backing file of `ino` if all its chunks are cached and
    /// there is none yet. `Ok(false)`: some chunk is not cached (yet).
    fn assemble(&self, ino: u32) -> Result<bool, String> {
        let Some(disk) = self.chunks.disk() else { return Ok(true) };
        let Some((size, chunks)) = self.file(ino) else { return Ok(true) };
        let key = file_key(size, &chunks);
        if disk.has_backing_file(&key) {
            return Ok(true);
        }
        if !chunks.iter().all(|c| self.chunks.is_cached(&c.chunk)) {
            return Ok(false);
        }
        disk.files_dir().map_err(|e| format!("creating the backing file directory: {e}"))?;
        let path = disk.backing_file_path(&key);
        if !disk.admit_backing_file(&key, size) {
            return Err(format!("backing file {} of inode {ino}: it does not fit under the cache's cap", path.display()));
        }
        let written = verified_file::create_marked(&path, &hex(&key), |file| {
            for c in &chunks {
                // Verified (memory, or disk re-verified); one evicted
                // meanwhile ends this attempt, a later read offers again.
                let data = self.chunks.cached_copy(&c.chunk).ok_or_else(|| io::Error::other(format!("chunk {} is no longer cached", hex(&c.chunk.digest))))?;
                file.write_all_at(&data, c.file_offset)?;
            }
            file.set_len(size)
        });
        match written {
            Ok(()) => {
                inc(&self.chunks.counters().backing_writes);
                // Inodes that remembered "none" look again.
                lock(&self.readers).pop(&ino);
                Ok(true)
            }
            Err(e) => {
                // Uncounted, and whatever was renamed into place unmarked removed.
                disk.remove_backing_file(&key);
                Err(format!("backing file {} of inode {ino}: {e}", path.display()))
            }
        }
    }
}

fn writer_loop(inner: Arc<Inner>, jobs: Receiver<u32>) {
    // Background work: readers come first.
    // SAFETY: sched_setscheduler of the calling thread with a valid param.
    let param = libc::sched_param { sched_priority: 0 };
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        tracing::debug!("backing files: cannot lower the writer's priority: {}", io::Error::last_os_error());
    }
    // Files offered while some of their chunks were still on the way (the
    // read of a file's end can be answered before reads of its middle):
    // looked at again shortly, a few times.
    let mut later: std::collections::VecDeque<(u32, Instant, u32)> = std::collections::VecDeque::new();
    loop {
        let due = later.front().map(|&(_, at, _)| at);
        let next = match due {
            Some(at) if at <= Instant::now() => later.pop_front().map(|(ino, _, tries)| (ino, tries)),
            Some(at) => match jobs.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(ino) => Some((ino, 0)),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => None,
            },
            None => jobs.recv().ok().map(|ino| (ino, 0)),
        };
        let Some((ino, tries)) = next else { break };
        if inner.stopping.load(Ordering::SeqCst) {
            break;
        }
        match inner.assemble(ino) {
            Ok(false) if tries < RETRIES => {
                later.push_back((ino, Instant::now() + RETRY_AFTER, tries + 1));
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("{e}"),
        }
        lock(&inner.pending).remove(&ino);
    }
}

/// How often, and after how long, a file whose chunks were not all cached
/// when offered is looked at again.
const RETRIES: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_millis(200);

impl BackingFiles {
    /// The backing files of a mount reading through `chunks`; `None` when
    /// there is no disk cache to keep them in.
    pub fn start(image: Arc<NaiadImage>, chunks: Arc<ChunkCache>) -> io::Result<Option<Self>> {
        if chunks.disk().is_none() {
            return Ok(None);
        }
        let inner = Arc::new(Inner {
            image,
            chunks,
            pending: Mutex::new(HashSet::new()),
            stopping: AtomicBool::new(false),
            readers: Mutex::new(lru::LruCache::new(std::num::NonZeroUsize::new(READERS).unwrap_or(std::num::NonZeroUsize::MIN))),
        });
        let (tx, rx) = mpsc::channel();
        let i = inner.clone();
        // Detached: see `stop`.
        std::thread::Builder::new().name("naiad-backing".into()).spawn(move || writer_loop(i, rx))?;
        Ok(Some(BackingFiles { inner, queue: Mutex::new(Some(tx)) }))
    }

    /// The verified backing file of inode `ino` and its key, if there is
    /// one (opened anew: for passthrough, which hands it to the kernel).
    pub fn open_verified(&self, ino: u32) -> Option<(File, FileKey)> {
        self.inner.open(ino)
    }

    /// The backing file to read inode `ino` from, if it has one; the answer
    /// (also "none") is remembered until a backing file is written for it.
    pub fn reader(&self, ino: u32) -> Option<Arc<File>> {
        if let Some(known) = lock(&self.inner.readers).get(&ino) {
            return known.clone();
        }
        let file = self.inner.open(ino).map(|(f, _)| Arc::new(f));
        lock(&self.inner.readers).put(ino, file.clone());
        file
    }

    /// Forgets the backing file of `ino` that failed a read (the next read
    /// goes through the chunks and looks again).
    pub fn forget_reader(&self, ino: u32) {
        lock(&self.inner.readers).pop(&ino);
    }

    /// Queues `ino` to get a backing file once its chunks are all cached.
    pub fn offer(&self, ino: u32) {
        if !lock(&self.inner.pending).insert(ino) {
            return;
        }
        let sent = lock(&self.queue).as_ref().is_some_and(|q| q.send(ino).is_ok());
        if !sent {
            lock(&self.inner.pending).remove(&ino);
        }
    }

    /// Offers every regular file of the image (the prefetch or
    /// `--fetch-all` finished).
    pub fn offer_all(&self) {
        for ino in 1..=self.inner.image.bootstrap.inode_count() {
            if self.inner.file(ino).is_some() {
                self.offer(ino);
            }
        }
    }

    /// Stops the writer after the file it is writing, without waiting for
    /// it: at idle priority it may wait long for the CPU, and a daemon must
    /// exit promptly (an upgrade waits for that). A write cut short by the
    /// exit leaves only a temporary file, removed by a later scan.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        lock(&self.queue).take();
        lock(&self.inner.pending).clear();
    }
}

impl Drop for BackingFiles {
    fn drop(&mut self) {
        self.stop();
    }
}
