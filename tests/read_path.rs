//! One read path: `naiad unpack` (and `check`) and the FUSE daemon's caches
//! read chunks through the same [`ChunkReader`], so one [`MergeLimits`]
//! governs the store requests of both. A counting store under the image
//! records every request the store is asked for.

mod common;

use std::sync::{Arc, Mutex};

use naiad_fuse::{ChunkCache, Counters, MemoryCache, Origin};
use naiad_reader::{ChunkReader, MergeLimits, NaiadImage};
use naiad_registry::{BlobStore, Digest, ImageRef};

/// A store that records the length of every range it is asked for.
struct CountingStore {
    inner: Arc<dyn BlobStore>,
    requests: Mutex<Vec<u64>>,
}

impl BlobStore for CountingStore {
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> naiad_registry::error::Result<Vec<u8>> {
        self.requests.lock().unwrap().push(len);
        self.inner.read_range(digest, offset, len)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn open_counted(layout: &std::path::Path) -> (Arc<NaiadImage>, Arc<CountingStore>) {
    let mut image = NaiadImage::open(&ImageRef::parse(&format!("oci:{}:latest", layout.display())).unwrap()).expect("open the converted image");
    let store = Arc::new(CountingStore { inner: image.store.clone(), requests: Mutex::new(Vec::new()) });
    image.store = store.clone();
    (Arc::new(image), store)
}

/// The generated test image, converted by `naiad convert` into `dir/naiad`.
fn converted_image(dir: &std::path::Path) -> std::path::PathBuf {
    let src = common::generated_image(dir, common::Compression::Gzip);
    let dst = dir.join("naiad");
    let out = common::naiad().args(["convert", "--quiet", &format!("oci:{}:latest", src.display()), &format!("oci:{}:latest", dst.display())]).output().unwrap();
    assert!(out.status.success(), "convert: {}", String::from_utf8_lossy(&out.stderr));
    dst
}

#[test]
fn one_merge_limit_governs_the_daemon_and_unpack() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = converted_image(tmp.path());

    let (probe, _) = open_counted(&dst);
    let records: Vec<_> = (0..probe.bootstrap.chunk_count()).map(|i| probe.bootstrap.chunk(i).unwrap()).collect();
    let largest_chunk = records.iter().map(|c| c.compressed_size as u64).max().unwrap();
    let stored: u64 = records.iter().map(|c| c.compressed_size as u64).sum();
    assert!(stored > 1 << 20, "the image has {stored} stored bytes, too few to split");

    // Requests made by unpack and by the daemon's chunk cache, each on a
    // fresh image whose reader plans under `limits`.
    let requests = |limits: MergeLimits| -> (Vec<u64>, Vec<u64>) {
        let (image, store) = open_counted(&dst);
        let reader = ChunkReader::new(image.clone(), limits);
        naiad_converter::unpack::unpack_to_tar(&reader, &tmp.path().join("out.tar")).expect("unpack");
        let unpack = std::mem::take(&mut *store.requests.lock().unwrap());
        let (image, store) = open_counted(&dst);
        let cache = ChunkCache::new(Arc::new(ChunkReader::new(image, limits)), MemoryCache::new(256 << 20), None, Arc::new(Counters::default()));
        let outcome = cache.load_batch(&records, Origin::Prefetch, |_| {});
        assert_eq!(outcome.failed.0, 0);
        let daemon = std::mem::take(&mut *store.requests.lock().unwrap());
        (unpack, daemon)
    };
    let mut counts = Vec::new();
    for max_request in [128 << 10, 1 << 20] {
        let limits = MergeLimits { gap: 64 << 10, max_request };
        let (unpack, daemon) = requests(limits);
        for (who, lens) in [("unpack", &unpack), ("daemon", &daemon)] {
            let over: Vec<_> = lens.iter().filter(|&&l| l > max_request.max(largest_chunk)).collect();
            assert!(over.is_empty(), "{who}: requests over the {max_request}-byte limit: {over:?}");
            assert!(lens.len() as u64 >= stored.div_ceil(max_request.max(largest_chunk)), "{who}: {} requests for {stored} bytes", lens.len());
        }
        eprintln!("max_request {max_request}: unpack {} requests, daemon {} requests ({stored} stored bytes)", unpack.len(), daemon.len());
        counts.push((unpack.len(), daemon.len()));
    }
    // The larger limit means fewer requests, for both.
    assert!(counts[1].0 < counts[0].0 && counts[1].1 < counts[0].1, "{counts:?}");
}

/// A store that shows each range it reads as growing prefixes, 4 KiB at
/// a time, as a registry's body arrives, noting how much it has shown.
struct TricklingStore {
    inner: Arc<dyn BlobStore>,
    shown: std::sync::atomic::AtomicU64,
}

impl BlobStore for TricklingStore {
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> naiad_registry::error::Result<Vec<u8>> {
        self.inner.read_range(digest, offset, len)
    }
    fn read_range_progressive(&self, digest: &Digest, offset: u64, len: u64, arrived: &mut dyn FnMut(&[u8])) -> naiad_registry::error::Result<Vec<u8>> {
        let data = self.inner.read_range(digest, offset, len)?;
        for end in (4096..data.len()).step_by(4096).chain([data.len()]) {
            self.shown.store(end as u64, std::sync::atomic::Ordering::SeqCst);
            arrived(&data[..end]);
        }
        Ok(data)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn chunks_are_handed_over_as_their_bytes_arrive() {
    use naiad_reader::ChunkFetcher;
    let tmp = tempfile::tempdir().unwrap();
    let dst = converted_image(tmp.path());
    let mut image = NaiadImage::open(&ImageRef::parse(&format!("oci:{}:latest", dst.display())).unwrap()).expect("open the converted image");
    let store = Arc::new(TricklingStore { inner: image.store.clone(), shown: Default::default() });
    image.store = store.clone();
    let image = Arc::new(image);
    // The chunks of blob 0 as one request.
    let chunks: Vec<_> = (0..image.bootstrap.chunk_count()).map(|i| image.bootstrap.chunk(i).unwrap()).filter(|c| c.blob_index == 0).collect();
    let limits = MergeLimits { gap: u64::MAX / 4, max_request: u64::MAX / 4 };
    assert_eq!(naiad_reader::plan(&chunks, &limits).len(), 1);
    let span_end = chunks.iter().map(|c| c.compressed_offset + c.compressed_size as u64).max().unwrap();
    let span = span_end - chunks.iter().map(|c| c.compressed_offset).min().unwrap();
    assert!(chunks.len() > 4 && span > 64 << 10, "{} chunks over {span} bytes: too few", chunks.len());

    let reader = ChunkReader::new(image.clone(), limits);
    let mut handed = vec![0u32; chunks.len()];
    let mut shown_at_first = None;
    reader.fetch_many(&chunks, &mut |i, r| {
        let data = r.expect("a verified chunk");
        assert_eq!(data.data.len() as u32, chunks[i].uncompressed_size);
        handed[i] += 1;
        shown_at_first.get_or_insert(store.shown.load(std::sync::atomic::Ordering::SeqCst));
    });
    assert!(handed.iter().all(|&n| n == 1), "every chunk handed over once: {handed:?}");
    let first = shown_at_first.unwrap();
    assert!(first < span, "the first chunk waited for the whole request ({first} of {span} bytes shown)");
}
