//! [`ChunkSink`]: where chunks go during conversion. It batches raw chunks,
//! hashes and compresses them on all cores, keeps one copy of each distinct
//! chunk (by blake3 digest) for the whole image, and appends new ones to the
//! blob being written. Memory stays bounded by the batch size.
//!
//! Small files are packed together: [`ChunkSink::add_small`] appends a
//! file's bytes to an open *chunk group* (one chunk holding several small
//! files, each file a piece of it), so a tree of small files compresses like
//! a tar and costs one chunk record per group, not per file. Identical small
//! files are stored once. Where a group ends is content-defined: after a
//! file whose digest says so (about one group per group size of small-file
//! bytes), or before a file that would take it past twice the group size. So a changed, added or removed file changes its own group, and the
//! groups after it are the same as before: a new version of an image shares
//! the groups of the old one that it did not touch (dedup across versions).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use naiad_format::{encode_hashed_chunk, BlobRecord, ChunkDigest, ChunkRecord, EncodedChunk};
use naiad_registry::layout::BlobWriter;
use naiad_registry::{Digest, OciLayout};
use rayon::prelude::*;

use crate::chunk_dict::{ChunkDict, DICT_BLOB_BASE, MIN_BLOB_USE};
use crate::error::{ConvertError, Result};

/// Sequence number of a chunk handed to the sink, resolved to a chunk
/// index once its batch is flushed.
pub type ChunkSeq = u64;

/// Part of a file: `len` bytes of chunk `seq` from `chunk_offset` on. A
/// large file's pieces are whole chunks; a small file is one piece of a
/// chunk group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub seq: ChunkSeq,
    pub chunk_offset: u32,
    pub len: u32,
}

/// zstd levels by kind of chunk.
#[derive(Debug, Clone, Copy)]
pub struct ZstdLevels {
    /// Chunks of large files.
    pub chunk: i32,
    /// Chunk groups: small files compress better together and at a higher
    /// level, and groups are a small part of most images' bytes.
    pub group: i32,
    /// Chunks and groups going to the prefetch blob: fetched on every cold
    /// start, so worth compressing hardest.
    pub prefetch: i32,
}

/// A chunk (or chunk group) waiting for its batch to be flushed.
struct Pending {
    seq: ChunkSeq,
    data: Vec<u8>,
    /// Goes to the prefetch blob.
    prefetch: bool,
    level: i32,
}

/// The prefetch set's stored chunks before they are ordered into their
/// blob: an unnamed temporary file, removed however the conversion ends.
struct PrefetchScratch {
    file: BufWriter<File>,
    len: u64,
}

/// Batches compressed at once.
const IN_FLIGHT: usize = 3;

/// A flushed batch being compressed: the new chunks with whether each goes
/// to the prefetch blob, and the sequence number and digest of every chunk
/// of the batch.
struct InFlight {
    job: std::thread::JoinHandle<Vec<(EncodedChunk, bool)>>,
    chunks: Vec<(ChunkSeq, ChunkDigest)>,
    /// New chunks a dictionary holds (records with dictionary blob ids).
    from_dict: Vec<ChunkRecord>,
}

pub struct ChunkSink {
    layout: OciLayout,
    levels: ZstdLevels,
    batch_limit: usize,
    pending: Vec<Pending>,
    in_flight: VecDeque<InFlight>,
    /// Digests of the new chunks of the batches in flight.
    in_flight_digests: HashSet<ChunkDigest>,
    pending_bytes: usize,
    /// Average size of a chunk group (uncompressed); none is larger than
    /// twice this.
    group_size: usize,
    /// The open group of each destination (layer blob, prefetch blob). A
    /// group joins `pending` when it closes.
    open_groups: [Option<Pending>; 2],
    /// Where each distinct small file's bytes already are.
    small_by_digest: HashMap<ChunkDigest, Piece>,
    /// The next chunk's (or group's) sequence number.
    next_seq: ChunkSeq,
    /// Chunk index of every committed sequence number (`u32::MAX`: not yet).
    seq_to_chunk: Vec<u32>,
    by_digest: HashMap<ChunkDigest, u32>,
    pub chunks: Vec<ChunkRecord>,
    pub blobs: Vec<BlobRecord>,
    current: Option<BlobWriter>,
    /// The startup (prefetch) set's chunks as they are compressed, in a
    /// scratch file opened on first use; [`ChunkSink::end_prefetch_blob`]
    /// writes them to their blob in the prefetch table's order, and they get
    /// their blob index and offset then.
    prefetch: Option<PrefetchScratch>,
    prefetch_chunks: Vec<u32>,
    /// Blobs this conversion added to the layout (removed again on failure).
    pub created: Vec<Digest>,
    /// The prefetch blob's index and how many bytes at its start hold the
    /// chunks the prefetch table names, once it is written.
    pub startup_set: Option<(usize, u64)>,
    /// Uncompressed bytes handed to the sink.
    pub bytes_in: u64,
    dict: Option<Arc<ChunkDict>>,
    /// Per dictionary blob id: the chunks referencing it, and the blobs in
    /// order of first use.
    dict_used: HashMap<u32, Vec<u32>>,
    dict_order: Vec<u32>,
}

impl ChunkSink {
    pub fn new(layout: OciLayout, levels: ZstdLevels, batch_limit: usize, group_size: usize) -> Self {
        ChunkSink {
            layout,
            levels,
            batch_limit,
            pending: Vec::new(),
            in_flight: VecDeque::new(),
            in_flight_digests: HashSet::new(),
            next_seq: 0,
            pending_bytes: 0,
            group_size,
            open_groups: [None, None],
            small_by_digest: HashMap::new(),
            seq_to_chunk: Vec::new(),
            by_digest: HashMap::new(),
            chunks: Vec::new(),
            blobs: Vec::new(),
            current: None,
            prefetch: None,
            prefetch_chunks: Vec::new(),
            startup_set: None,
            created: Vec::new(),
            bytes_in: 0,
            dict: None,
            dict_used: HashMap::new(),
            dict_order: Vec::new(),
        }
    }

    /// Chunk records taken from the dictionary.
    pub fn dict_chunks(&self) -> u64 {
        self.dict_used.values().map(|v| v.len() as u64).sum()
    }

    /// New chunks that `dict` holds are referenced there, not stored.
    pub fn use_dict(&mut self, dict: Arc<ChunkDict>) {
        self.dict = Some(dict);
    }

    /// Starts the blob that new chunks are appended to.
    pub fn begin_blob(&mut self) -> Result<()> {
        self.current = Some(self.layout.blob_writer()?);
        Ok(())
    }

    /// Queues a chunk and returns its sequence number. A new chunk marked
    /// `prefetch` goes to the prefetch blob instead of the layer's blob.
    pub fn add(&mut self, data: Vec<u8>, prefetch: bool) -> Result<ChunkSeq> {
        let seq = self.take_seq();
        self.bytes_in += data.len() as u64;
        let level = if prefetch { self.levels.prefetch } else { self.levels.chunk };
        self.queue(Pending { seq, data, prefetch, level })?;
        Ok(seq)
    }

    fn take_seq(&mut self) -> ChunkSeq {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Queues a chunk (or a closed group) for the next batch.
    fn queue(&mut self, p: Pending) -> Result<()> {
        self.pending_bytes += p.data.len();
        self.pending.push(p);
        if self.pending_bytes >= self.batch_limit {
            self.flush()?;
        }
        Ok(())
    }

    /// Whether a group ends after a small file: with a probability of its
    /// length over the group size, decided by its digest (so by its content
    /// alone).
    fn ends_group(&self, digest: &ChunkDigest, len: usize) -> bool {
        let mut x = [0u8; 8];
        x.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(x) % (self.group_size.max(1) as u64) < len as u64
    }

    /// Packs a small file into the open chunk group of its destination (a
    /// new one when there is none or it would not fit) and returns where
    /// its bytes are. A file identical to one added before gets that file's
    /// piece.
    pub fn add_small(&mut self, data: &[u8], prefetch: bool) -> Result<Piece> {
        self.bytes_in += data.len() as u64;
        self.pack(data, prefetch)
    }

    /// Packs a copy of bytes already added in a larger chunk into the
    /// prefetch blob's chunk groups, or as a chunk of its own when it is
    /// larger than a group: the pages a startup set wants of a chunk it
    /// wants only in part. Not counted as file bytes in.
    pub fn add_startup_copy(&mut self, data: Vec<u8>) -> Result<Piece> {
        if data.len() > self.group_size {
            let len = data.len() as u32;
            let seq = self.take_seq();
            self.queue(Pending { seq, data, prefetch: true, level: self.levels.prefetch })?;
            return Ok(Piece { seq, chunk_offset: 0, len });
        }
        self.pack(&data, true)
    }

    fn pack(&mut self, data: &[u8], prefetch: bool) -> Result<Piece> {
        let digest = *blake3::hash(data).as_bytes();
        if let Some(&piece) = self.small_by_digest.get(&digest) {
            return Ok(piece);
        }
        let slot = prefetch as usize;
        if self.open_groups[slot].as_ref().is_some_and(|g| g.data.len() + data.len() > 2 * self.group_size) {
            self.close_group(slot)?;
        }
        if self.open_groups[slot].is_none() {
            let seq = self.take_seq();
            let level = if prefetch { self.levels.prefetch } else { self.levels.group };
            self.open_groups[slot] = Some(Pending { seq, data: Vec::with_capacity(2 * self.group_size), prefetch, level });
        }
        let ends = self.ends_group(&digest, data.len());
        let group = self.open_groups[slot].as_mut().ok_or_else(|| ConvertError::Invalid("no open chunk group".into()))?;
        let piece = Piece { seq: group.seq, chunk_offset: group.data.len() as u32, len: data.len() as u32 };
        group.data.extend_from_slice(data);
        self.small_by_digest.insert(digest, piece);
        if ends {
            self.close_group(slot)?;
        }
        Ok(piece)
    }

    fn close_group(&mut self, slot: usize) -> Result<()> {
        match self.open_groups[slot].take() {
            Some(g) => self.queue(g),
            None => Ok(()),
        }
    }

    /// The chunk index of a sequence number, once the sink is drained.
    pub fn chunk_index(&self, seq: ChunkSeq) -> Option<u32> {
        self.seq_to_chunk.get(seq as usize).copied().filter(|&i| i != u32::MAX)
    }

    /// Hands the queued chunks to the thread pool: hashes them (here, so
    /// that which are new is decided against every earlier batch) and
    /// compresses the new ones in the background while the caller reads on.
    /// At most [`IN_FLIGHT`] batches are compressed at once (so the pool
    /// has the next batch's work when one batch's last chunks hold a
    /// thread); the oldest is appended to its blob before another starts.
    pub fn flush(&mut self) -> Result<()> {
        while self.in_flight.len() >= IN_FLIGHT {
            self.commit_in_flight()?;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let digests: Vec<ChunkDigest> = pending.par_iter().map(|p| *blake3::hash(&p.data).as_bytes()).collect();
        let chunks: Vec<(ChunkSeq, ChunkDigest)> = pending.iter().map(|p| p.seq).zip(digests.iter().copied()).collect();
        // Decide which chunks are new, in order; duplicates inside the batch count once.
        let mut fresh: Vec<(Pending, ChunkDigest)> = Vec::new();
        let mut batch_first: HashSet<ChunkDigest> = HashSet::new();
        let mut from_dict: Vec<ChunkRecord> = Vec::new();
        for (p, d) in pending.into_iter().zip(&digests) {
            // New: in no committed batch, no batch in flight, and not
            // earlier in this one. Batches commit in order, so a digest
            // another batch in flight brings is in the map when this one
            // commits. A new chunk a dictionary holds is referenced there,
            // unless it belongs to the startup set (kept in one blob).
            if !self.by_digest.contains_key(d) && !self.in_flight_digests.contains(d) && batch_first.insert(*d) {
                match self.dict.as_ref().and_then(|dict| dict.get(d)).filter(|_| !p.prefetch) {
                    Some(c) => from_dict.push(c.record),
                    None => fresh.push((p, *d)),
                }
            }
        }
        self.in_flight_digests.extend(fresh.iter().map(|(_, d)| *d).chain(from_dict.iter().map(|c| c.digest)));
        let job = std::thread::Builder::new()
            .name("naiad-compress".into())
            .spawn(move || fresh.par_iter().map(|(p, d)| (encode_hashed_chunk(&p.data, *d, p.level), p.prefetch)).collect())
            .map_err(|source| ConvertError::Io { path: "compression thread".into(), source })?;
        self.in_flight.push_back(InFlight { job, chunks, from_dict });
        Ok(())
    }

    /// Waits for the oldest batch in flight and appends its new chunks, in
    /// order, to their blobs; its sequence numbers get their chunk indexes.
    fn commit_in_flight(&mut self) -> Result<()> {
        let Some(InFlight { job, chunks, from_dict }) = self.in_flight.pop_front() else { return Ok(()) };
        let encoded = job.join().map_err(|_| ConvertError::Invalid("the compression thread panicked".into()))?;
        for (e, to_prefetch) in encoded {
            let index = self.chunks.len() as u32;
            let (offset, blob_index) = if to_prefetch {
                if self.prefetch.is_none() {
                    let file = tempfile::tempfile().map_err(|source| ConvertError::Io { path: "prefetch scratch file".into(), source })?;
                    self.prefetch = Some(PrefetchScratch { file: BufWriter::with_capacity(1 << 20, file), len: 0 });
                }
                let scratch = self.prefetch.as_mut().ok_or_else(|| ConvertError::Invalid("no prefetch scratch file".into()))?;
                scratch.file.write_all(&e.stored).map_err(|source| ConvertError::Io { path: "prefetch scratch file".into(), source })?;
                scratch.len += e.stored.len() as u64;
                self.prefetch_chunks.push(index);
                // The blob index and offset are set when the prefetch blob is written.
                (scratch.len - e.stored.len() as u64, u32::MAX)
            } else {
                let writer = self.current.as_mut().ok_or_else(|| ConvertError::Invalid("chunk added outside a blob".into()))?;
                let offset = writer.bytes_written();
                writer.write_all(&e.stored).map_err(|source| ConvertError::Io { path: "blob".into(), source })?;
                (offset, self.blobs.len() as u32)
            };
            self.chunks.push(ChunkRecord {
                digest: e.digest,
                compressed_offset: offset,
                blob_index,
                compressed_size: e.stored.len() as u32,
                uncompressed_size: e.uncompressed_size,
            });
            self.by_digest.insert(e.digest, index);
            self.in_flight_digests.remove(&e.digest);
        }
        for mut c in from_dict {
            let index = self.chunks.len() as u32;
            let blob = c.blob_index;
            c.blob_index = DICT_BLOB_BASE + blob;
            self.chunks.push(c);
            self.by_digest.insert(c.digest, index);
            self.in_flight_digests.remove(&c.digest);
            let used = self.dict_used.entry(blob).or_insert_with(|| {
                self.dict_order.push(blob);
                Vec::new()
            });
            used.push(index);
        }
        for (seq, d) in &chunks {
            // Every digest is in the map now: either from before or just written.
            let index = self.by_digest.get(d).copied().ok_or_else(|| ConvertError::Invalid("chunk lost during flush".into()))?;
            let seq = *seq as usize;
            if self.seq_to_chunk.len() <= seq {
                self.seq_to_chunk.resize(seq + 1, u32::MAX);
            }
            self.seq_to_chunk[seq] = index;
        }
        Ok(())
    }

    /// Closes the open groups, flushes everything queued and waits until it
    /// is written: after it every sequence number has its chunk index.
    pub fn drain(&mut self) -> Result<()> {
        self.close_group(0)?;
        self.close_group(1)?;
        self.flush()?;
        while !self.in_flight.is_empty() {
            self.commit_in_flight()?;
        }
        Ok(())
    }

    /// Drains and commits the current blob under its digest. A blob that
    /// received no chunk is discarded.
    pub fn end_blob(&mut self) -> Result<()> {
        self.drain()?;
        let Some(writer) = self.current.take() else { return Ok(()) };
        if writer.bytes_written() == 0 {
            return Ok(());
        }
        let (digest, size) = writer.commit()?;
        self.created.push(digest.clone());
        self.blobs.push(BlobRecord { sha256: digest.bytes(), size });
        Ok(())
    }

    /// Writes the prefetch blob, if any chunk went to it: its chunks in the
    /// order of `table` (the prefetch table: chunk indexes, the first
    /// occurrence counting), then any others in the order they came, so a
    /// reader streaming the blob gets what the workload needs first first.
    /// (`table` names chunk indexes, which a sequence number has only once
    /// the sink is drained: compute it after [`ChunkSink::drain`].)
    pub fn end_prefetch_blob(&mut self, table: &[u32]) -> Result<()> {
        self.drain()?;
        let Some(scratch) = self.prefetch.take() else { return Ok(()) };
        let scratch_err = |source| ConvertError::Io { path: "prefetch scratch file".into(), source };
        let file = scratch.file.into_inner().map_err(|e| scratch_err(e.into_error()))?;
        let in_scratch: HashSet<u32> = self.prefetch_chunks.iter().copied().collect();
        let mut placed = HashSet::new();
        let order: Vec<u32> = table.iter().chain(&self.prefetch_chunks).copied().filter(|c| in_scratch.contains(c) && placed.insert(*c)).collect();
        let in_table: HashSet<u32> = table.iter().copied().collect();
        let mut writer = self.layout.blob_writer()?;
        let mut buf = Vec::new();
        let mut set_bytes = 0;
        for &c in &order {
            let record = &mut self.chunks[c as usize];
            buf.resize(record.compressed_size as usize, 0);
            file.read_exact_at(&mut buf, record.compressed_offset).map_err(scratch_err)?;
            record.compressed_offset = writer.bytes_written();
            writer.write_all(&buf).map_err(|source| ConvertError::Io { path: "prefetch blob".into(), source })?;
            if in_table.contains(&c) {
                set_bytes = writer.bytes_written();
            }
        }
        let (digest, size) = writer.commit()?;
        let index = self.blobs.len() as u32;
        if set_bytes > 0 {
            self.startup_set = Some((index as usize, set_bytes));
        }
        for &c in &order {
            self.chunks[c as usize].blob_index = index;
        }
        self.created.push(digest.clone());
        self.blobs.push(BlobRecord { sha256: digest.bytes(), size });
        Ok(())
    }

    /// Gives the dictionary chunks their final blob: each dictionary blob
    /// the image uses enough of ([`MIN_BLOB_USE`]) joins the blob table;
    /// the chunks of the others are copied, as stored, into one blob of the
    /// image's own. Returns the dictionary blob ids referenced, in blob
    /// table order. Call after [`ChunkSink::end_prefetch_blob`].
    pub fn end_dict_blobs(&mut self) -> Result<Vec<usize>> {
        self.drain()?;
        let Some(dict) = self.dict.clone() else { return Ok(Vec::new()) };
        let mut kept = Vec::new();
        let mut copied: Vec<u32> = Vec::new();
        for &blob in &self.dict_order {
            let used: u64 = self.dict_used[&blob].iter().map(|&c| self.chunks[c as usize].compressed_size as u64).sum();
            let size = dict.blobs[blob as usize].record.size;
            if used as f64 >= MIN_BLOB_USE * size as f64 {
                let index = self.blobs.len() as u32;
                for &c in &self.dict_used[&blob] {
                    self.chunks[c as usize].blob_index = index;
                }
                self.blobs.push(dict.blobs[blob as usize].record);
                kept.push(blob as usize);
            } else {
                copied.extend(&self.dict_used[&blob]);
            }
        }
        if !copied.is_empty() {
            let index = self.blobs.len() as u32;
            let mut writer = self.layout.blob_writer()?;
            for batch in copied.chunks(256) {
                let records: Vec<ChunkRecord> = batch
                    .iter()
                    .map(|&c| {
                        let mut r = self.chunks[c as usize];
                        r.blob_index -= DICT_BLOB_BASE;
                        r
                    })
                    .collect();
                for (&c, stored) in batch.iter().zip(dict.read_stored(&records)?) {
                    let offset = writer.bytes_written();
                    writer.write_all(&stored).map_err(|source| ConvertError::Io { path: "blob".into(), source })?;
                    let r = &mut self.chunks[c as usize];
                    (r.blob_index, r.compressed_offset) = (index, offset);
                }
            }
            let (digest, size) = writer.commit()?;
            self.created.push(digest.clone());
            self.blobs.push(BlobRecord { sha256: digest.bytes(), size });
        }
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels() -> ZstdLevels {
        ZstdLevels { chunk: 3, group: 6, prefetch: 19 }
    }

    /// Feeds the same chunks and small files through a sink whose batches
    /// are tiny (so several are in flight at once); returns each input's
    /// (chunk index, offset), the chunk table and the blob digest.
    fn run(dir: &std::path::Path, inputs: &[(Vec<u8>, bool)]) -> (Vec<(u32, u32)>, Vec<ChunkRecord>, Vec<BlobRecord>) {
        let mut sink = ChunkSink::new(OciLayout::open_or_create(dir).unwrap(), levels(), 3000, 2000);
        sink.begin_blob().unwrap();
        let mut pieces = Vec::new();
        for (data, small) in inputs {
            pieces.push(if *small { sink.add_small(data, false).unwrap() } else { Piece { seq: sink.add(data.clone(), false).unwrap(), chunk_offset: 0, len: data.len() as u32 } });
        }
        sink.end_blob().unwrap();
        let resolved = pieces.iter().map(|p| (sink.chunk_index(p.seq).expect("every piece resolves after the drain"), p.chunk_offset)).collect();
        (resolved, sink.chunks.clone(), sink.blobs.clone())
    }

    #[test]
    fn batches_in_flight_dedup_in_order_and_reproducibly() {
        // 40 distinct 1000-byte chunks, each given 3 times, 5 batches apart
        // (so a repeat meets its first copy still in flight), and small
        // files packed into groups, some identical.
        let chunk = |i: u32| -> Vec<u8> { (0..1000u32).map(|j| ((i * 7919 + j * 31) % 251) as u8).collect() };
        let mut inputs = Vec::new();
        for round in 0..3 {
            for i in 0..40u32 {
                inputs.push((chunk(i), false));
                inputs.push((format!("small {} {round}", i % 7).into_bytes(), true));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let (resolved, chunks, blobs) = run(dir.path(), &inputs);
        for ((data, small), (index, offset)) in inputs.iter().zip(&resolved) {
            let c = &chunks[*index as usize];
            if *small {
                assert!(c.uncompressed_size as usize >= *offset as usize + data.len(), "a small file lies inside its group");
            } else {
                assert_eq!(c.digest, *blake3::hash(data).as_bytes(), "a chunk's sequence number resolves to its own chunk");
            }
        }
        let whole: HashSet<ChunkDigest> = chunks.iter().map(|c| c.digest).collect();
        assert_eq!(whole.len(), chunks.len(), "each distinct chunk is stored once");
        assert!(chunks.iter().filter(|c| c.uncompressed_size == 1000).count() == 40, "40 distinct chunks, repeats deduplicated");
        // The 21 distinct small files are stored once each, in groups.
        let small: HashSet<(u32, u32)> = inputs.iter().zip(&resolved).filter(|((_, s), _)| *s).map(|(_, r)| *r).collect();
        assert_eq!(small.len(), 21);
        // The blob holds every chunk back to back, in index order.
        let mut end = 0;
        for c in &chunks {
            assert_eq!(c.compressed_offset, end);
            end += c.compressed_size as u64;
        }
        assert_eq!(blobs[0].size, end);

        let again = tempfile::tempdir().unwrap();
        let (resolved2, chunks2, blobs2) = run(again.path(), &inputs);
        assert_eq!((resolved, chunks, blobs), (resolved2, chunks2, blobs2), "the same input gives the same output");
    }
}
