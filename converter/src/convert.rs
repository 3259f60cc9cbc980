//! The conversion driver: source image in, naiad image tagged in the
//! destination layout out.
//!
//! Nothing at the destination changes unless the conversion succeeds: a new
//! layout is built in a temporary directory beside it and renamed into
//! place; in an existing layout, blobs appear under their digests (which no
//! manifest names yet) and index.json is replaced atomically at the very
//! end, and a failed conversion removes the blobs it added.
//!
//! A `docker://` source is streamed from the registry. A `docker://`
//! destination is staged in a temporary OCI layout, pushed (blobs, then
//! the manifest under the tag) and the layout removed afterwards.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use naiad_reader::NaiadImage;
use naiad_registry::{open_source_with, push_image, Digest, ImageRef, OciLayout, PushSummary, RegistryOptions, SourceImage};
use serde::Serialize;

use crate::bootstrap_writer::{write_bootstrap, TreeCounts};
use crate::chunk_dict::{self, ChunkDict};
use crate::chunk_sink::{ChunkSink, Piece, ZstdLevels};
use crate::chunker::{Chunking, SplitError};
use crate::error::{ConvertError, Result};
use crate::layer::{check_media_type, decompress};
use crate::package::package;
use crate::prefetch::{prefetch_table, PrefetchList};
use crate::read_ahead::ReadAhead;
use crate::tree::{split_path, Meta, Node, NodeKind, Tree};

/// Receives progress while a conversion runs.
pub trait Progress: Send + Sync {
    /// Layer `index` of `count` starts; `size` is its stored size.
    fn layer_started(&self, index: usize, count: usize, digest: &str, size: u64);
    /// `bytes` more stored (compressed) bytes of the current layer were read.
    fn advanced(&self, bytes: u64);
    /// The conversion finished or failed.
    fn finished(&self);
}

/// A chunk dictionary to convert against.
#[derive(Clone, Debug)]
pub enum ChunkDictSource {
    Image(ImageRef),
    /// `--chunk-dict auto`: the naiad image at the destination's tag; in a
    /// layout without one, the newest naiad image the layout holds (the
    /// last in its index). None is no error.
    Auto,
}

/// Default zstd level of a chunk of a large file. Level 15 makes blobs
/// about 10 % smaller than level 3 and converts about 7x slower (README,
/// conversion, `cargo bench --bench convert`): a chunk is compressed once and fetched on every cold start
/// that reads it (lazy `node -e`: 20.9 MB fetched against 23.8 MB).
pub const DEFAULT_ZSTD_LEVEL: i32 = 15;

#[derive(Clone)]
pub struct ConvertOptions {
    pub chunking: Chunking,
    pub zstd_level: i32,
    /// Uncompressed bytes gathered before hashing and compressing them in parallel.
    pub batch_bytes: usize,
    pub progress: Option<Arc<dyn Progress>>,
    /// What a workload reads at startup: those chunks go into one blob of
    /// their own, and the bootstrap's prefetch table lists them in order.
    pub prefetch: Option<Arc<PrefetchList>>,
    /// zstd level for the chunks of the prefetch blob.
    pub prefetch_zstd_level: i32,
    /// Regular files smaller than this many bytes are packed into shared
    /// chunks (chunk groups) instead of getting chunks of their own; 0
    /// turns packing off.
    pub small_file_max: u32,
    /// Average uncompressed size of a chunk group (none is larger than
    /// twice this).
    pub group_size: u32,
    /// zstd level for chunk groups.
    pub group_zstd_level: i32,
    /// Earlier naiad images whose chunks are referenced instead of stored
    /// again (`--chunk-dict`, repeatable).
    pub chunk_dicts: Vec<ChunkDictSource>,
    /// How to reach registries for `docker://` sources and destinations.
    pub registry: RegistryOptions,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunking: Chunking::default(),
            zstd_level: DEFAULT_ZSTD_LEVEL,
            batch_bytes: 8 << 20,
            progress: None,
            prefetch: None,
            prefetch_zstd_level: 19,
            small_file_max: 32 << 10,
            group_size: 128 << 10,
            group_zstd_level: 6,
            chunk_dicts: Vec::new(),
            registry: RegistryOptions::default(),
        }
    }
}

/// What a conversion did; printed by `naiad convert --json`.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertSummary {
    pub source: String,
    pub destination: String,
    pub manifest_digest: String,
    pub layers: usize,
    #[serde(flatten)]
    pub tree: TreeCounts,
    /// Stored size of the source layers.
    pub source_layer_bytes: u64,
    /// Uncompressed file bytes cut into chunks (all layers, before dedup).
    pub bytes_in: u64,
    /// Blob bytes plus the compressed bootstrap.
    pub bytes_out: u64,
    pub blob_bytes: u64,
    pub blobs: usize,
    pub bootstrap_bytes: u64,
    pub bootstrap_compressed_bytes: u64,
    pub chunks: u64,
    pub unique_chunks: u64,
    /// File bytes handed to the chunker over the bytes of the distinct
    /// chunks stored (both uncompressed): what deduplication saved.
    pub dedup_ratio: f64,
    pub seconds: f64,
    /// For a `docker://` destination: what the push did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<PushSummary>,
    /// The chunk dictionaries used.
    pub chunk_dicts: Vec<String>,
    /// Chunk records that point into a dictionary's chunks (referenced in
    /// its blobs, or copied out of those used too little).
    pub dict_chunks: u64,
    /// Dictionary blobs the image references.
    pub dict_blobs: usize,
    /// Bytes of the blobs this conversion wrote (`blob_bytes` less the
    /// dictionary blobs referenced).
    pub new_blob_bytes: u64,
}

/// Converts `source` into a naiad image at `destination` (an `oci:` layout).
pub fn convert(source: &ImageRef, destination: &ImageRef, opts: &ConvertOptions) -> Result<ConvertSummary> {
    opts.chunking.validate().map_err(ConvertError::Invalid)?;
    if opts.small_file_max > opts.group_size || opts.group_size > naiad_format::bootstrap::MAX_CHUNK_SIZE / 2 {
        return Err(ConvertError::Invalid(format!(
            "small files up to {} bytes cannot be packed into chunk groups of {} bytes (the group size must be at least the small-file size and at most {})",
            opts.small_file_max,
            opts.group_size,
            naiad_format::bootstrap::MAX_CHUNK_SIZE / 2
        )));
    }
    for level in [opts.zstd_level, opts.group_zstd_level, opts.prefetch_zstd_level] {
        if !(1..=22).contains(&level) {
            return Err(ConvertError::Invalid(format!("zstd level {level} must be 1 to 22")));
        }
    }
    // A registry destination is first written to a temporary layout.
    let (dst_dir, dst_tag, staging) = match destination {
        ImageRef::Layout { dir, tag } => (dir.clone(), tag.clone(), None),
        ImageRef::Docker(r) => {
            if r.tag.is_none() && r.digest.is_some() {
                return Err(ConvertError::Invalid(format!("destination {destination}: give a tag to push to, not a digest")));
            }
            let tmp = tempfile::Builder::new().prefix("naiad-push-").tempdir().map_err(|source| ConvertError::Io { path: std::env::temp_dir(), source })?;
            (tmp.path().join("layout"), r.tag_or_latest().to_string(), Some((tmp, r.clone())))
        }
        ImageRef::DockerArchive { .. } => {
            return Err(ConvertError::Invalid(format!("destination {destination}: must be an OCI layout (oci:DIR[:TAG]) or a registry (docker://...)")));
        }
    };
    let started = Instant::now();
    let dict = open_chunk_dicts(&opts.chunk_dicts, destination, &opts.registry)?;
    let src = open_source_with(source, &opts.registry)?;
    let target = Destination::prepare(&dst_dir)?;
    let result = convert_into(&src, &target.layout, &dst_tag, opts, dict.as_ref(), staging.is_some());
    if let Some(p) = &opts.progress {
        p.finished();
    }
    match result {
        Ok(mut summary) => match target.commit() {
            Ok(()) => {
                if let Some((tmp, dst)) = staging {
                    let layout = OciLayout::open(&dst_dir)?;
                    // Blobs may come from the source's repository, or a
                    // dictionary's.
                    let mount_from: Vec<&naiad_registry::DockerReference> = std::iter::once(source)
                        .chain(dict.iter().flat_map(|d| d.references()))
                        .filter_map(|r| match r {
                            ImageRef::Docker(d) => Some(d),
                            _ => None,
                        })
                        .collect();
                    let pushed = push_image(&layout, &dst_tag, &dst, &opts.registry, &mount_from)?;
                    summary.push = Some(pushed);
                    drop(tmp);
                }
                summary.source = source.to_string();
                summary.destination = destination.to_string();
                summary.seconds = started.elapsed().as_secs_f64();
                Ok(summary)
            }
            Err(e) => Err(e),
        },
        Err((e, sink_created)) => {
            target.abort(&sink_created);
            Err(e)
        }
    }
}

/// The layout being written, and how to make it visible or undo it.
struct Destination {
    layout: OciLayout,
    /// For a new layout: (temporary dir, final dir).
    fresh: Option<(PathBuf, PathBuf)>,
    preexisting: HashSet<Digest>,
}

impl Destination {
    fn prepare(dir: &Path) -> Result<Self> {
        let io = |source| ConvertError::Io { path: dir.to_path_buf(), source };
        let exists_nonempty = dir.is_dir() && std::fs::read_dir(dir).map_err(io)?.next().is_some();
        if dir.join("oci-layout").exists() {
            let layout = OciLayout::open(dir)?;
            let mut preexisting = HashSet::new();
            let blobs = dir.join("blobs/sha256");
            if let Ok(rd) = std::fs::read_dir(&blobs) {
                for e in rd.flatten() {
                    if let Ok(d) = Digest::parse(&format!("sha256:{}", e.file_name().to_string_lossy())) {
                        preexisting.insert(d);
                    }
                }
            }
            return Ok(Destination { layout, fresh: None, preexisting });
        }
        if exists_nonempty {
            return Err(ConvertError::Invalid(format!("destination {}: exists and is not an OCI layout", dir.display())));
        }
        if dir.exists() && !dir.is_dir() {
            return Err(ConvertError::Invalid(format!("destination {}: exists and is not a directory", dir.display())));
        }
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "layout".into());
        let tmp = tempfile::Builder::new().prefix(&format!(".{name}.naiad-")).tempdir_in(&parent).map_err(|source| ConvertError::Io { path: parent.clone(), source })?.keep();
        let layout = OciLayout::open_or_create(&tmp)?;
        Ok(Destination { layout, fresh: Some((tmp, dir.to_path_buf())), preexisting: HashSet::new() })
    }

    fn commit(self) -> Result<()> {
        if let Some((tmp, dst)) = &self.fresh {
            if dst.is_dir() {
                // An empty directory: rename replaces it.
                let _ = std::fs::remove_dir(dst);
            }
            if let Err(source) = std::fs::rename(tmp, dst) {
                let _ = std::fs::remove_dir_all(tmp);
                return Err(ConvertError::Io { path: dst.clone(), source });
            }
        }
        Ok(())
    }

    fn abort(self, created: &[Digest]) {
        match &self.fresh {
            Some((tmp, _)) => {
                let _ = std::fs::remove_dir_all(tmp);
            }
            None => {
                for d in created {
                    if !self.preexisting.contains(d) {
                        let _ = std::fs::remove_file(self.layout.blob_path(d));
                    }
                }
            }
        }
    }
}

type Failure = (ConvertError, Vec<Digest>);

/// Opens the dictionaries `sources` name (resolving `auto` against the
/// destination).
fn open_chunk_dicts(sources: &[ChunkDictSource], destination: &ImageRef, options: &RegistryOptions) -> Result<Option<Arc<ChunkDict>>> {
    let mut refs = Vec::new();
    for s in sources {
        match s {
            ChunkDictSource::Image(r) => refs.push(r.clone()),
            ChunkDictSource::Auto => refs.extend(auto_dict(destination, options)),
        }
    }
    if refs.is_empty() {
        return Ok(None);
    }
    let dst = match destination {
        ImageRef::Docker(d) => chunk_dict::Destination::Registry(d),
        _ => chunk_dict::Destination::Layout,
    };
    Ok(Some(Arc::new(ChunkDict::open(&refs, dst, options)?)))
}

/// `--chunk-dict auto`: the naiad image at the destination's tag, or in a
/// layout the last naiad image of its index.
fn auto_dict(destination: &ImageRef, options: &RegistryOptions) -> Option<ImageRef> {
    let is_naiad = |r: &ImageRef| NaiadImage::open_with(r, options).is_ok();
    match destination {
        ImageRef::Layout { dir, tag } => {
            let layout = OciLayout::open(dir).ok()?;
            let at_tag = ImageRef::Layout { dir: dir.clone(), tag: tag.clone() };
            if layout.resolve(tag).is_ok() && is_naiad(&at_tag) {
                return Some(at_tag);
            }
            let index = layout.index().ok()?;
            index
                .manifests
                .iter()
                .rev()
                .filter_map(|m| m.annotations.as_ref()?.get("org.opencontainers.image.ref.name").cloned())
                .map(|t| ImageRef::Layout { dir: dir.clone(), tag: t })
                .find(is_naiad)
        }
        ImageRef::Docker(d) => {
            if is_naiad(destination) {
                return Some(destination.clone());
            }
            // The newest other tag of the repository that is a naiad image:
            // tags compared as versions (digit runs by number), a few tried.
            let client = naiad_registry::RegistryClient::for_reference(d, options).ok()?;
            let mut tags = client.list_tags(&d.repository).ok()?;
            tags.sort_by(|a, b| version_order(b, a));
            tags.into_iter()
                .take(8)
                .map(|t| {
                    let mut r = d.clone();
                    (r.tag, r.digest) = (Some(t), None);
                    ImageRef::Docker(r)
                })
                .find(is_naiad)
        }
        ImageRef::DockerArchive { .. } => None,
    }
}

/// Orders tags as versions: runs of digits compare by number, the rest
/// bytewise (`v1.10` after `v1.9`).
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for ((da, xa), (db, xb)) in pa.iter().zip(&pb) {
        let o = match (da, db) {
            (true, true) => {
                let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
                ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
            }
            _ => xa.cmp(xb),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Converts `src` into `layout` (the destination, or the staging layout of
/// a registry destination: `to_registry`) and tags it.
fn convert_into(
    src: &SourceImage,
    layout: &OciLayout,
    tag: &str,
    opts: &ConvertOptions,
    dict: Option<&Arc<ChunkDict>>,
    to_registry: bool,
) -> std::result::Result<ConvertSummary, Failure> {
    let levels = ZstdLevels { chunk: opts.zstd_level, group: opts.group_zstd_level, prefetch: opts.prefetch_zstd_level };
    let mut sink = ChunkSink::new(layout.clone(), levels, opts.batch_bytes, opts.group_size as usize);
    if let Some(d) = dict {
        sink.use_dict(d.clone());
    }
    let mut tree = Tree::new();
    let mut source_layer_bytes = 0;
    let fail = |e: ConvertError, sink: &ChunkSink| (e, sink.created.clone());
    for (i, layer) in src.layers.iter().enumerate() {
        if let Err(e) = apply_layer(src, i, &mut tree, &mut sink, opts) {
            return Err(fail(e, &sink));
        }
        source_layer_bytes += layer.size;
    }
    if let Err(e) = sink.drain() {
        return Err(fail(e, &sink));
    }
    let prefetch = match &opts.prefetch {
        Some(list) => prefetch_table(list, &mut tree, &sink),
        None => Vec::new(),
    };
    if let Err(e) = sink.end_prefetch_blob(&prefetch) {
        return Err(fail(e, &sink));
    }
    let dict_blobs = match sink.end_dict_blobs() {
        Ok(kept) => kept,
        Err(e) => return Err(fail(e, &sink)),
    };
    // The dictionary blobs the image references: copied into the layout
    // (checked against their digests), or for a registry dictionary and
    // destination, checked to be there (the push mounts them).
    if let Some(d) = dict {
        for &id in &dict_blobs {
            let put = if to_registry && d.repository_of(id).is_some() { d.check_remote_blob(id).map(|_| false) } else { d.copy_blob(id, layout) };
            match put {
                Ok(true) => sink.created.push(d.blobs[id].digest.clone()),
                Ok(false) => {}
                Err(e) => return Err(fail(e, &sink)),
            }
        }
    }
    let (bootstrap, counts) = match write_bootstrap(&tree, &sink, opts.chunking.params(), prefetch) {
        Ok(x) => x,
        Err(e) => return Err(fail(e, &sink)),
    };
    let packaged = match package(layout, &bootstrap, &sink.blobs, sink.startup_set, &src.config, src.manifest_digest.as_ref()) {
        Ok(p) => p,
        Err(e) => return Err(fail(e, &sink)),
    };
    let mut created = sink.created.clone();
    created.extend(packaged.written.iter().cloned());
    if let Err(e) = layout.set_tag(tag, packaged.manifest.clone()) {
        return Err((e.into(), created));
    }
    let blob_bytes: u64 = sink.blobs.iter().map(|b| b.size).sum();
    let unique = sink.chunks.len() as u64;
    let unique_bytes: u64 = sink.chunks.iter().map(|c| c.uncompressed_size as u64).sum();
    let summary = ConvertSummary {
        source: String::new(),
        destination: String::new(),
        manifest_digest: packaged.manifest.digest.clone(),
        layers: src.layers.len(),
        source_layer_bytes,
        bytes_in: sink.bytes_in,
        bytes_out: blob_bytes + packaged.bootstrap_layer_size,
        blob_bytes,
        blobs: sink.blobs.len(),
        bootstrap_bytes: bootstrap.len() as u64,
        bootstrap_compressed_bytes: packaged.bootstrap_layer_size,
        chunks: counts.chunk_refs,
        unique_chunks: unique,
        dedup_ratio: if unique_bytes == 0 { 1.0 } else { sink.bytes_in as f64 / unique_bytes as f64 },
        tree: counts,
        seconds: 0.0,
        push: None,
        chunk_dicts: dict.map(|d| d.references().iter().map(|r| r.to_string()).collect()).unwrap_or_default(),
        dict_chunks: sink.dict_chunks(),
        dict_blobs: dict_blobs.len(),
        new_blob_bytes: blob_bytes - dict.map(|d| dict_blobs.iter().map(|&id| d.blobs[id].record.size).sum::<u64>()).unwrap_or(0),
    };
    Ok(summary)
}

/// Counts stored bytes for progress.
struct Counted<R> {
    inner: R,
    progress: Option<Arc<dyn Progress>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(p) = &self.progress {
            p.advanced(n as u64);
        }
        Ok(n)
    }
}

fn apply_layer(src: &SourceImage, index: usize, tree: &mut Tree, sink: &mut ChunkSink, opts: &ConvertOptions) -> Result<()> {
    let layer = &src.layers[index];
    let digest = layer.digest.to_string();
    check_media_type(layer)?;
    if let Some(p) = &opts.progress {
        p.layer_started(index, src.layers.len(), &digest, layer.size);
    }
    let layer_err = |reason: String| ConvertError::Layer { layer: digest.clone(), reason };
    let mut stream = src.open_layer(index)?;
    let raw = Box::new(Counted { inner: stream.take_reader(), progress: opts.progress.clone() });
    let (_, decompressed) = decompress(raw, &digest)?;
    // Reading, digest checking and decompressing run on a thread of their own.
    let decompressed = ReadAhead::spawn(decompressed).map_err(|e| layer_err(format!("cannot start its reader thread: {e}")))?;
    let mut archive = tar::Archive::new(decompressed);
    sink.begin_blob()?;
    let entries = archive.entries().map_err(|e| layer_err(format!("not a tar stream: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| layer_err(format!("corrupt or truncated: {e}")))?;
        apply_entry(&mut entry, index, tree, sink, opts, &digest)?;
    }
    // Read the rest of the stream so truncation and digest mismatches show.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| layer_err(format!("corrupt or truncated: {e}")))?;
    drop(rest);
    stream.finish().map_err(|e| layer_err(format!("{e}")))?;
    sink.end_blob()?;
    Ok(())
}

/// PAX records naiad reads beyond what the tar crate applies itself.
#[derive(Default)]
struct PaxInfo {
    mtime: Option<(i64, u32)>,
    uid: Option<u64>,
    gid: Option<u64>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn parse_pax_time(v: &str) -> Option<(i64, u32)> {
    let (sec, frac) = match v.split_once('.') {
        Some((s, f)) => (s, f),
        None => (v, ""),
    };
    let sec: i64 = sec.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    // A negative time with a fraction counts the fraction towards zero.
    if sec < 0 && nsec > 0 {
        return Some((sec - 1, 1_000_000_000 - nsec));
    }
    Some((sec, nsec))
}

fn read_pax<R: Read>(entry: &mut tar::Entry<R>) -> std::io::Result<PaxInfo> {
    let mut info = PaxInfo::default();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let key = ext.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                info.xattrs.insert(name.to_vec(), ext.value_bytes().to_vec());
            } else {
                let value = std::str::from_utf8(ext.value_bytes()).unwrap_or("");
                match key {
                    b"mtime" => info.mtime = parse_pax_time(value),
                    b"uid" => info.uid = value.parse().ok(),
                    b"gid" => info.gid = value.parse().ok(),
                    _ => {}
                }
            }
        }
    }
    Ok(info)
}

fn apply_entry<R: Read>(entry: &mut tar::Entry<R>, layer_index: usize, tree: &mut Tree, sink: &mut ChunkSink, opts: &ConvertOptions, digest: &str) -> Result<()> {
    let path_bytes = entry.path_bytes().into_owned();
    let path_str = String::from_utf8_lossy(&path_bytes).into_owned();
    let entry_err = |reason: String| ConvertError::Entry { layer: digest.to_string(), path: crate::error::shorten_path(&path_str), reason };
    let header = entry.header().clone();
    let kind = header.entry_type();
    if kind.is_pax_global_extensions() {
        return Ok(());
    }
    let parts = split_path(&path_bytes).map_err(&entry_err)?;
    let pax = read_pax(entry).map_err(|e| entry_err(format!("bad PAX header: {e}")))?;

    // Whiteouts carry no file of their own.
    if let Some(last) = parts.last() {
        if let Some(hidden) = last.strip_prefix(b".wh.") {
            let dir = &parts[..parts.len() - 1];
            return if hidden == b".wh..opq" { tree.opaque(dir, layer_index) } else { tree.whiteout(dir, hidden, layer_index) }.map_err(&entry_err);
        }
    }

    let num = |r: std::io::Result<u64>, what: &str| -> Result<u64> { r.map_err(|e| entry_err(format!("bad {what} field: {e}"))) };
    let uid = match pax.uid {
        Some(u) => u,
        None => num(header.uid(), "uid")?,
    };
    let gid = match pax.gid {
        Some(g) => g,
        None => num(header.gid(), "gid")?,
    };
    let (mtime_sec, mtime_nsec) = match pax.mtime {
        Some(t) => t,
        None => (num(header.mtime(), "mtime")? as i64, 0),
    };
    let meta = Meta {
        mode: header.mode().map_err(|e| entry_err(format!("bad mode field: {e}")))? & 0o7777,
        uid: u32::try_from(uid).map_err(|_| entry_err(format!("uid {uid} does not fit 32 bits")))?,
        gid: u32::try_from(gid).map_err(|_| entry_err(format!("gid {gid} does not fit 32 bits")))?,
        mtime_sec,
        mtime_nsec,
        xattrs: pax.xattrs,
    };
    let link_target = || -> Result<Vec<u8>> {
        match entry.link_name_bytes() {
            Some(l) if !l.is_empty() => Ok(l.into_owned()),
            _ => Err(entry_err("link without a target".into())),
        }
    };
    let devices = || -> Result<(u32, u32)> {
        let major = header.device_major().map_err(|e| entry_err(format!("bad device major: {e}")))?.unwrap_or(0);
        let minor = header.device_minor().map_err(|e| entry_err(format!("bad device minor: {e}")))?.unwrap_or(0);
        Ok((major, minor))
    };
    use tar::EntryType as T;
    let node_kind = match kind {
        T::Directory => NodeKind::Dir { children: BTreeMap::new() },
        T::Symlink => NodeKind::Symlink { target: link_target()? },
        T::Char => {
            let (major, minor) = devices()?;
            NodeKind::CharDevice { major, minor }
        }
        T::Block => {
            let (major, minor) = devices()?;
            NodeKind::BlockDevice { major, minor }
        }
        T::Fifo => NodeKind::Fifo,
        T::Link => {
            let target = link_target()?;
            let target_parts = split_path(&target).map_err(|e| entry_err(format!("hardlink target: {e}")))?;
            return tree.hardlink(&parts, &target_parts, layer_index).map_err(&entry_err);
        }
        T::Regular | T::Continuous | T::GNUSparse => {
            let expected = entry.size();
            let mut pieces = Vec::new();
            // Chunks a prefetch list wants go to the prefetch blob.
            let abs_path = format!("/{}", parts.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>().join("/"));
            let prefetch = opts.prefetch.as_deref().filter(|l| l.wants_file(&abs_path));
            let size = if expected > 0 && expected < opts.small_file_max as u64 {
                // A small file: read whole (bounded by the limit, whatever the
                // header claims) and packed into a chunk group.
                let mut data = Vec::with_capacity(expected as usize);
                (&mut *entry).take(opts.small_file_max as u64).read_to_end(&mut data).map_err(|io| entry_err(format!("corrupt or truncated: {io}")))?;
                if !data.is_empty() {
                    let wanted = prefetch.is_some_and(|l| !l.wanted_within(&abs_path, 0, data.len() as u64).is_empty());
                    pieces.push(sink.add_small(&data, wanted)?);
                }
                data.len() as u64
            } else {
                let mut offset = 0u64;
                opts.chunking
                    .split(&mut *entry, |data| {
                        let len = data.len() as u64;
                        let wanted = prefetch.map(|l| l.wanted_within(&abs_path, offset, offset + len)).unwrap_or_default();
                        add_file_chunk(sink, data, offset, &wanted, &mut pieces)?;
                        offset += len;
                        Ok::<(), ConvertError>(())
                    })
                    .map_err(|e| match e {
                        SplitError::Read(io) => entry_err(format!("corrupt or truncated: {io}")),
                        SplitError::Emit(e) => e,
                    })?
            };
            if size != expected {
                return Err(entry_err(format!("has {size} bytes of data, header says {expected}")));
            }
            NodeKind::File { size, pieces }
        }
        other => return Err(entry_err(format!("unsupported tar entry type {other:?}"))),
    };
    tree.put(&parts, Node { meta, kind: node_kind }, layer_index).map_err(&entry_err)
}

/// Adds one chunk of a large file, the bytes `[offset, offset + len)`, and
/// its pieces; `wanted` is what a prefetch list wants of it (sorted,
/// disjoint, inside the chunk).
///
/// A chunk wanted whole, or nearly (three quarters of its bytes), goes to
/// the prefetch blob. A chunk wanted in part stays in its layer's blob, and
/// copies of the wanted parts go to the prefetch blob, packed into its
/// chunk groups: the file's pieces name the copies for the wanted bytes and
/// the chunk for the rest, so a startup set holds what the workload read
/// rather than every chunk it touched (SPEC §5.3).
fn add_file_chunk(sink: &mut ChunkSink, data: Vec<u8>, offset: u64, wanted: &[(u64, u64)], pieces: &mut Vec<Piece>) -> Result<()> {
    let len = data.len() as u64;
    let wanted_bytes: u64 = wanted.iter().map(|(s, e)| e - s).sum();
    if wanted_bytes == 0 || wanted_bytes * 4 >= len * 3 {
        pieces.push(Piece { seq: sink.add(data, wanted_bytes > 0)?, chunk_offset: 0, len: len as u32 });
        return Ok(());
    }
    let copies: Vec<Vec<u8>> = wanted.iter().map(|&(s, e)| data[(s - offset) as usize..(e - offset) as usize].to_vec()).collect();
    let whole = sink.add(data, false)?;
    let rest = |from: u64, to: u64| Piece { seq: whole, chunk_offset: (from - offset) as u32, len: (to - from) as u32 };
    let mut at = offset;
    for (&(s, e), copy) in wanted.iter().zip(copies) {
        if s > at {
            pieces.push(rest(at, s));
        }
        pieces.push(sink.add_startup_copy(copy)?);
        at = e;
    }
    if at < offset + len {
        pieces.push(rest(at, offset + len));
    }
    Ok(())
}

#[cfg(test)]
mod version_order_tests {
    #[test]
    fn tags_order_as_versions() {
        let mut tags = vec!["v1.10", "v1.9", "latest", "v1.9.1", "v2", "v1.09"];
        tags.sort_by(|a, b| super::version_order(a, b));
        assert_eq!(tags, vec!["latest", "v1.9", "v1.09", "v1.9.1", "v1.10", "v2"]);
    }
}

#[cfg(test)]
mod tests {
    use super::parse_pax_time;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("1700000000.123456789"), Some((1700000000, 123456789)));
        assert_eq!(parse_pax_time("1700000000.5"), Some((1700000000, 500000000)));
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("-1.5"), Some((-2, 500000000)));
        assert_eq!(parse_pax_time("x"), None);
    }
}
