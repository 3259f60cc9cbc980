//! Opening a converted (naiad) image: find the bootstrap layer in the
//! manifest, decompress and validate it, and give a [`BlobStore`] for its
//! chunk blobs. This is all a reader (the FUSE daemon, `naiad check`,
//! `naiad unpack`) needs before its first chunk read, which goes through
//! [`crate::ChunkReader`].
//!
//! The image may be in an OCI layout (chunks read from the blob files) or
//! in a registry (`docker://`: the bootstrap is downloaded, chunks are read
//! lazily with HTTP range requests through a
//! [`naiad_registry::RegistryBlobStore`]). A mount that will prefetch the
//! startup set starts reading it as soon as the manifest names it
//! ([`ANNOTATION_STARTUP_SET`]), side by side with the bootstrap, so the
//! set's first bytes are on their way before the bootstrap is decoded.

use std::collections::HashSet;
use std::io::Read;
use std::sync::{Arc, OnceLock};

use naiad_format::oci::{ANNOTATION_BOOTSTRAP_DIGEST, ANNOTATION_FORMAT, ANNOTATION_STARTUP_SET, FORMAT_VERSION, MEDIA_TYPE_BLOB, MEDIA_TYPE_BOOTSTRAP};
use naiad_format::Bootstrap;
use serde_json::Value;

use naiad_registry::error::{RegistryError, Result};
use naiad_registry::{open_source_reading, BlobRange, BlobStore, Digest, ImageRef, LayerBlob, LayerReads, RegistryClient, RegistryOptions, RegistryStats};

use crate::bootstrap_cache::BootstrapCache;

/// Largest bootstrap naiad accepts, uncompressed.
pub const MAX_BOOTSTRAP_SIZE: u64 = 4 << 30;
/// A bootstrap inflates to at most this many times its compressed size
/// (real ones: about 3x), or [`MIN_INFLATE_LIMIT`], whichever is larger.
const MAX_INFLATE_RATIO: u64 = 32;
const MIN_INFLATE_LIMIT: u64 = 16 << 20;
/// The largest startup set read before the bootstrap is in (its bytes are
/// held in memory until the prefetch takes them); a larger one is read
/// once the bootstrap is decoded, as without the annotation.
pub const MAX_STARTUP_SET_AHEAD: u64 = 64 << 20;

/// The startup set's bytes that a manifest's layers announce
/// ([`ANNOTATION_STARTUP_SET`] on a blob layer), if they are plausible: a
/// blob layer's first bytes, at most its size and
/// [`MAX_STARTUP_SET_AHEAD`]. The annotation is only a hint: every chunk
/// read from these bytes is still checked against the bootstrap.
pub fn startup_set_range(layers: &[LayerBlob]) -> Option<BlobRange> {
    layers.iter().filter(|l| l.media_type == MEDIA_TYPE_BLOB).find_map(|l| {
        let len: u64 = l.annotations.get(ANNOTATION_STARTUP_SET)?.parse().ok()?;
        (len > 0 && len <= l.size && len <= MAX_STARTUP_SET_AHEAD).then(|| BlobRange { digest: l.digest.clone(), offset: 0, len })
    })
}

/// Decompresses a bootstrap layer without trusting it: the header comes
/// first, and only as many bytes as it declares are inflated, if that is
/// plausible for a blob of this size (a decompression bomb declares, or
/// inflates to, far more).
fn inflate_bootstrap(compressed: &[u8]) -> std::result::Result<Vec<u8>, String> {
    use naiad_format::bootstrap::{HEADER_SIZE, MAGIC};
    let limit = (compressed.len() as u64).saturating_mul(MAX_INFLATE_RATIO).clamp(MIN_INFLATE_LIMIT, MAX_BOOTSTRAP_SIZE);
    let mut decoder = zstd::stream::read::Decoder::new(compressed).map_err(|e| format!("cannot decompress: {e}"))?;
    let mut raw = vec![0u8; HEADER_SIZE];
    decoder.read_exact(&mut raw).map_err(|e| format!("cannot decompress the header: {e}"))?;
    if raw[..8] != MAGIC {
        return Err("not a naiad bootstrap (bad magic)".into());
    }
    let declared = u64::from_le_bytes(raw[16..24].try_into().map_err(|_| "short header".to_string())?);
    if declared < HEADER_SIZE as u64 || declared > limit {
        return Err(format!("the header declares {declared} bytes, more than a {}-byte layer may inflate to ({limit})", compressed.len()));
    }
    decoder.take(declared - HEADER_SIZE as u64 + 1).read_to_end(&mut raw).map_err(|e| format!("cannot decompress: {e}"))?;
    if raw.len() as u64 != declared {
        return Err(format!("inflates to {} bytes, but its header declares {declared}", raw.len()));
    }
    Ok(raw)
}

/// A naiad image opened for reading.
pub struct NaiadImage {
    pub reference: ImageRef,
    pub bootstrap: Bootstrap,
    /// Digest of each blob, by blob index.
    pub blob_digests: Vec<Digest>,
    pub store: Arc<dyn BlobStore>,
    /// The image config (Entrypoint, Cmd, Env, ... under `config`).
    pub config: Value,
    /// Compressed size of the bootstrap layer.
    pub bootstrap_layer_size: u64,
    /// The bootstrap was mapped from a [`BootstrapCache`], not decoded.
    pub bootstrap_cached: bool,
    /// The registry client chunks are read through, for a `docker://` image.
    registry: Option<RegistryClient>,
    /// The prefetch table, read at its first use.
    startup_set: OnceLock<StartupSet>,
}

/// An image's startup set: the chunks of its prefetch table (a recorded
/// startup, SPEC §2.12), which the prefetcher fetches, the page pusher
/// pushes and reads of its files follow.
#[derive(Debug, Default)]
pub struct StartupSet {
    /// Chunk indexes in the table's order (first access), as stored.
    pub order: Vec<u32>,
    members: HashSet<u32>,
}

impl StartupSet {
    fn new(order: Vec<u32>) -> Self {
        let members = order.iter().copied().collect();
        StartupSet { order, members }
    }

    pub fn contains(&self, chunk_index: u32) -> bool {
        self.members.contains(&chunk_index)
    }

    /// No prefetch table: the image was converted without a trace.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl NaiadImage {
    /// Opens `reference`, checks it is a naiad image and validates its
    /// bootstrap; a registry is reached with default options (anonymous or
    /// docker config credentials, plain HTTP for loopback only).
    pub fn open(reference: &ImageRef) -> Result<Self> {
        Self::open_with(reference, &RegistryOptions::default())
    }

    /// [`NaiadImage::open`] with registry options (credentials, mirrors,
    /// timeouts, ...) for a `docker://` reference.
    pub fn open_with(reference: &ImageRef, options: &RegistryOptions) -> Result<Self> {
        Self::open_cached(reference, options, None, &|_| false)
    }

    /// [`NaiadImage::open_with`], taking the decoded bootstrap from `cache`
    /// when it holds the image's (and keeping it there when not). A
    /// registry image's startup set ([`startup_set_range`]) is read from the
    /// moment the manifest is in if `read_startup_set` says so: for a mount
    /// that will prefetch it, and does not have it yet.
    pub fn open_cached(reference: &ImageRef, options: &RegistryOptions, cache: Option<&BootstrapCache>, read_startup_set: &dyn Fn(&BlobRange) -> bool) -> Result<Self> {
        // The bootstrap is read with the manifest, side by side with the
        // config, unless the cache holds it (`fetched` is its read: `None`
        // only when cached, or when there is no bootstrap layer, which is
        // refused below).
        let mut cached = None;
        let (source, fetched) = open_source_reading(reference, options, |layers| {
            let ahead = startup_set_range(layers).filter(read_startup_set).into_iter().collect();
            let whole = layers.iter().find(|l| l.media_type == MEDIA_TYPE_BOOTSTRAP).and_then(|boot| {
                cached = cache.and_then(|c| c.load(&boot.digest));
                cached.is_none().then(|| (boot.digest.clone(), boot.size.min(MAX_BOOTSTRAP_SIZE)))
            });
            LayerReads { whole, ahead }
        })?;
        let bad = |reason: String| RegistryError::BadImage { reference: reference.to_string(), reason };
        let format = source.manifest.annotations.as_ref().and_then(|a| a.get(ANNOTATION_FORMAT));
        if format.is_some_and(|v| v != FORMAT_VERSION) {
            return Err(bad(format!("naiad format version {:?} is not supported (this build reads {FORMAT_VERSION:?})", format.map(String::as_str).unwrap_or(""))));
        }
        let is_naiad = format.is_some();
        let boot = source.layers.iter().find(|l| l.media_type == MEDIA_TYPE_BOOTSTRAP);
        let boot = match (is_naiad, boot) {
            (true, Some(b)) => b.clone(),
            _ => return Err(bad("not a naiad image (no naiad bootstrap layer); convert it first with `naiad convert`".into())),
        };
        if matches!(reference, ImageRef::DockerArchive { .. }) {
            return Err(bad("naiad images are read from an OCI layout (oci:DIR[:TAG]) or a registry (docker://...)".into()));
        }
        let bootstrap_cached = cached.is_some();
        let bootstrap = match cached {
            Some(b) => b,
            None => {
                let compressed = fetched.ok_or_else(|| bad(format!("bootstrap layer {} was not read", boot.digest)))??;
                let b = Self::decode_bootstrap(reference, &compressed, &boot)?;
                if let Some(c) = cache {
                    c.store(&boot.digest, &b);
                }
                b
            }
        };
        let blob_digests: Vec<Digest> = bootstrap.blobs().map_err(|e| bad(format!("bootstrap {}: {e}", boot.digest)))?.iter().map(|b| Digest::from_sha256(&b.sha256)).collect();
        for d in &blob_digests {
            if !source.layers.iter().any(|l| &l.digest == d && l.media_type == MEDIA_TYPE_BLOB) {
                return Err(bad(format!("bootstrap names blob {d}, which the manifest does not list")));
            }
        }
        Ok(NaiadImage {
            reference: reference.clone(),
            bootstrap,
            blob_digests,
            store: source.blob_store()?,
            registry: source.registry_client().cloned(),
            config: source.config.clone(),
            bootstrap_layer_size: boot.size,
            bootstrap_cached,
            startup_set: OnceLock::new(),
        })
    }

    /// The image's startup set, read from the bootstrap once; empty (with
    /// a warning) when its prefetch table cannot be read.
    pub fn startup_set(&self) -> &StartupSet {
        self.startup_set.get_or_init(|| match self.bootstrap.prefetch() {
            Ok(order) => StartupSet::new(order),
            Err(e) => {
                tracing::warn!("{}: cannot read the prefetch table: {e}", self.reference);
                StartupSet::default()
            }
        })
    }

    /// The image's bootstrap from its layer `compressed` (read checked
    /// against its digest and the manifest's size before anything is
    /// inflated): the result checked against its digest annotation, then
    /// decoded and validated.
    fn decode_bootstrap(reference: &ImageRef, compressed: &[u8], boot: &LayerBlob) -> Result<Bootstrap> {
        let bad = |reason: String| RegistryError::BadImage { reference: reference.to_string(), reason };
        let raw = inflate_bootstrap(compressed).map_err(|reason| bad(format!("bootstrap layer {}: {reason}", boot.digest)))?;
        if let Some(expected) = boot.annotations.get(ANNOTATION_BOOTSTRAP_DIGEST) {
            let actual = Digest::of(&raw);
            if actual.as_str() != expected {
                return Err(bad(format!("bootstrap {}: uncompressed content does not match its digest annotation {expected}", boot.digest)));
            }
        }
        let bootstrap = Bootstrap::from_bytes(raw).map_err(|e| bad(format!("bootstrap {}: {e}", boot.digest)))?;
        bootstrap.validate().map_err(|e| bad(format!("bootstrap {}: {e}", boot.digest)))?;
        Ok(bootstrap)
    }

    /// Requests, retries, tokens, mirror use and bytes received so far, for
    /// an image read from a registry.
    pub fn registry_stats(&self) -> Option<RegistryStats> {
        self.registry.as_ref().map(RegistryClient::stats)
    }

    /// The registry client chunks are read through, for a `docker://` image.
    pub fn registry_client(&self) -> Option<&RegistryClient> {
        self.registry.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_startup_set_keeps_the_table_order_and_answers_membership() {
        let set = StartupSet::new(vec![7, 2, 9, 2]);
        assert_eq!(set.order, vec![7, 2, 9, 2], "the table as stored: the prefetcher dedups by digest");
        assert!(set.contains(7) && set.contains(2) && set.contains(9));
        assert!(!set.contains(3) && !set.is_empty());
        assert!(StartupSet::default().is_empty() && !StartupSet::default().contains(0));
    }

    fn layer(media_type: &str, size: u64, startup_set: Option<&str>) -> LayerBlob {
        let mut annotations = std::collections::BTreeMap::new();
        if let Some(v) = startup_set {
            annotations.insert(ANNOTATION_STARTUP_SET.to_string(), v.to_string());
        }
        LayerBlob { digest: Digest::of(format!("{media_type}{size}{startup_set:?}").as_bytes()), media_type: media_type.into(), size, annotations }
    }

    #[test]
    fn the_startup_set_is_taken_from_a_plausible_annotation_only() {
        let set = |layers: &[LayerBlob]| startup_set_range(layers).map(|r| (r.offset, r.len));
        assert_eq!(set(&[layer(MEDIA_TYPE_BLOB, 1000, None), layer(MEDIA_TYPE_BLOB, 5000, Some("4000"))]), Some((0, 4000)));
        assert_eq!(set(&[layer(MEDIA_TYPE_BLOB, 1000, None)]), None, "no annotation");
        // Hostile or broken values are ignored: the set is then read once
        // the bootstrap says where it is.
        for bad in ["", "-1", "12x", "0", "5001", "18446744073709551616"] {
            assert_eq!(set(&[layer(MEDIA_TYPE_BLOB, 5000, Some(bad))]), None, "{bad:?}");
        }
        let huge = MAX_STARTUP_SET_AHEAD + 1;
        assert_eq!(set(&[layer(MEDIA_TYPE_BLOB, huge, Some(&huge.to_string()))]), None, "more than it may hold in memory");
        assert_eq!(set(&[layer(MEDIA_TYPE_BOOTSTRAP, 5000, Some("4000"))]), None, "only on a blob layer");
    }
}
