//! [`PagePusher`]: puts a startup set's pages into the kernel's page cache
//! (FUSE_NOTIFY_STORE) as soon as they are in memory, so that a workload's
//! page faults on them are served by the kernel, without a FUSE read each.
//!
//! A mount that runs from a startup set reads with one page of kernel
//! read-ahead ([`crate::filesystem::STARTUP_SET_READAHEAD`]): the set then
//! holds the pages the workload touched, not the pages around them, so it
//! crosses the link sooner. Each fault would then be a FUSE round trip of
//! its own; the pusher saves most of them. When a file of the set is read,
//! it is *poked*: a thread of its own hands the kernel every piece of the
//! file that is in the set, cached and not handed over yet, in runs of
//! adjacent pieces. The kernel knows the inode by then (it is reading it),
//! so the store lands. A piece whose chunk is not in yet is pushed at a
//! later poke of its file.
//!
//! Only verified chunk bytes are stored, at the file offsets the bootstrap
//! gives them: what a FUSE read of those bytes would return. A store the
//! kernel refuses is logged and the pieces are tried again at the next poke.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use fuser::{INodeNo, Notifier};
use naiad_format::FileChunk;
use naiad_reader::NaiadImage;

use crate::chunk_cache::ChunkCache;
use crate::counters::add;

/// The most bytes one store hands the kernel.
const MAX_STORE: u64 = 1 << 20;

/// The page size stores are cut at.
const PAGE: u64 = 4096;

/// The stores `[at, end)` that hand over `len` bytes from file offset
/// `start`: at most [`MAX_STORE`] each, cut at page boundaries, so that
/// only the pages at the two ends of a run can be partly filled (the
/// kernel keeps a page it was given in part out of use until read).
fn store_parts(start: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = start + len;
    let mut at = start;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next = ((at + MAX_STORE) / PAGE * PAGE).min(end);
        let part = (at, next);
        at = next;
        Some(part)
    })
}

/// The pieces of one file still to hand over.
enum FilePieces {
    /// Not looked at yet.
    Unknown,
    /// Set pieces not pushed yet, in file order (empty: all done).
    Left(Vec<FileChunk>),
}

#[derive(Default)]
struct Queue {
    /// Inodes poked and not handled yet, in poke order.
    pending: VecDeque<u32>,
    queued: HashSet<u32>,
    /// Per inode seen: what is left of it.
    files: HashMap<u32, FilePieces>,
}

pub struct PagePusher {
    image: Arc<NaiadImage>,
    chunks: Arc<ChunkCache>,
    notifier: OnceLock<Notifier>,
    queue: Mutex<Queue>,
    wake: Condvar,
    stop: AtomicBool,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PagePusher {
    /// A pusher for the pieces of `image` in its prefetch table; None when
    /// the table is empty. Pushes nothing until [`PagePusher::attach`].
    pub fn new(image: Arc<NaiadImage>, chunks: Arc<ChunkCache>) -> Option<Arc<Self>> {
        if image.startup_set().is_empty() {
            return None;
        }
        Some(Arc::new(PagePusher { image, chunks, notifier: OnceLock::new(), queue: Mutex::new(Queue::default()), wake: Condvar::new(), stop: AtomicBool::new(false) }))
    }

    /// Starts pushing through `notifier` (the mount's FUSE session), on a
    /// thread of its own that runs until [`PagePusher::stop`].
    pub fn attach(self: &Arc<Self>, notifier: Notifier) -> std::io::Result<()> {
        if self.notifier.set(notifier).is_err() {
            return Ok(());
        }
        let me = self.clone();
        std::thread::Builder::new().name("naiad-page-push".into()).spawn(move || me.run()).map(|_| ())
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.notify_all();
    }

    /// File `ino` is being read: hand over what of its set is in memory.
    pub fn poke(&self, ino: u32) {
        if self.notifier.get().is_none() {
            return;
        }
        let mut q = lock(&self.queue);
        if matches!(q.files.get(&ino), Some(FilePieces::Left(left)) if left.is_empty()) || !q.queued.insert(ino) {
            return;
        }
        q.pending.push_back(ino);
        drop(q);
        self.wake.notify_one();
    }

    fn run(&self) {
        loop {
            let (ino, pieces) = {
                let mut q = lock(&self.queue);
                loop {
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Some(ino) = q.pending.pop_front() {
                        q.queued.remove(&ino);
                        // Out of the map while handled: a poke meanwhile queues it again.
                        let pieces = q.files.remove(&ino).unwrap_or(FilePieces::Unknown);
                        break (ino, pieces);
                    }
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            let pieces = match pieces {
                FilePieces::Left(left) => left,
                FilePieces::Unknown => self.set_pieces(ino),
            };
            let left = self.push(ino, pieces);
            lock(&self.queue).files.insert(ino, FilePieces::Left(left));
        }
    }

    /// The pieces of file `ino` whose chunk is in the startup set.
    fn set_pieces(&self, ino: u32) -> Vec<FileChunk> {
        match self.image.bootstrap.file_chunks_in_range(ino, 0, u64::MAX) {
            Ok(pieces) => pieces.into_iter().filter(|p| self.image.startup_set().contains(p.chunk_index)).collect(),
            Err(e) => {
                tracing::debug!("inode {ino}: no pages pushed: {e}");
                Vec::new()
            }
        }
    }

    /// Stores the pieces whose chunks are cached, in runs of adjacent
    /// pieces; returns the others, and those of runs the kernel refused.
    fn push(&self, ino: u32, pieces: Vec<FileChunk>) -> Vec<FileChunk> {
        let Some(notifier) = self.notifier.get() else { return pieces };
        let mut left = Vec::new();
        let mut run: Vec<FileChunk> = Vec::new();
        let mut bytes: Vec<u8> = Vec::new();
        let flush = |run: &mut Vec<FileChunk>, bytes: &mut Vec<u8>, left: &mut Vec<FileChunk>| {
            if let Some(first) = run.first() {
                let start = first.file_offset;
                let stored =
                    store_parts(start, bytes.len() as u64).try_for_each(|(at, end)| notifier.store(INodeNo(ino as u64), at, &bytes[(at - start) as usize..(end - start) as usize]));
                match stored {
                    Ok(()) => add(&self.chunks.counters().pushed_bytes, bytes.len() as u64),
                    Err(e) => {
                        tracing::debug!("inode {ino}: the kernel refused {} bytes at {start}: {e}", bytes.len());
                        left.append(run);
                    }
                }
            }
            run.clear();
            bytes.clear();
        };
        for piece in pieces {
            let data = self.chunks.cached_copy(&piece.chunk);
            let Some(part) = data.as_deref().and_then(|d| piece.slice(d)) else {
                flush(&mut run, &mut bytes, &mut left);
                left.push(piece);
                continue;
            };
            if run.last().is_some_and(|last| last.file_end() != piece.file_offset) {
                flush(&mut run, &mut bytes, &mut left);
            }
            bytes.extend_from_slice(part);
            run.push(piece);
        }
        flush(&mut run, &mut bytes, &mut left);
        left.sort_by_key(|p| p.file_offset);
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_are_cut_at_pages_and_cover_the_run() {
        let parts: Vec<_> = store_parts(100, 2 * MAX_STORE + 5000).collect();
        assert_eq!(parts, [(100, MAX_STORE), (MAX_STORE, 2 * MAX_STORE), (2 * MAX_STORE, 2 * MAX_STORE + 5100)]);
        assert_eq!(store_parts(8192, 4096).collect::<Vec<_>>(), [(8192, 12288)]);
        assert_eq!(store_parts(5, 0).count(), 0);
    }
}
