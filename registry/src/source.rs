//! [`SourceImage`]: an image opened for reading, whatever store it is in
//! (OCI layout, docker archive, registry). It gives the config and a
//! verified raw reader for each layer; from a registry the layer bytes
//! stream straight from the HTTP response, nothing is copied locally.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::blob_stream::BlobStream;
use crate::digest::{Digest, DigestCheck, DigestReader};
use crate::docker_archive::DockerArchive;
use crate::error::{IoContext, RegistryError, Result};
use crate::layout::{OciLayout, MAX_JSON_SIZE};
use crate::manifest::*;
use crate::reference::ImageRef;
use crate::registry_client::RegistryClient;
use crate::registry_options::RegistryOptions;
use crate::remote_image::resolve_reading;
use crate::remote_store::RegistryBlobStore;
use crate::started_reads::{BlobRange, StartedReads};
use crate::store::{BlobStore, LayoutBlobStore};

/// One layer blob of a source image.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// What to read of an image's layers as soon as its manifest is known.
#[derive(Debug, Default)]
pub struct LayerReads {
    /// A whole blob (its digest, and the most bytes to read), read side by
    /// side with the config; its outcome is returned with the image.
    pub whole: Option<(Digest, u64)>,
    /// Ranges to start reading at once, for the image's blob store to serve
    /// later reads from (registries only; a layout reads fast anyway).
    pub ahead: Vec<BlobRange>,
}

enum Backend {
    Layout(OciLayout),
    Archive { archive: DockerArchive, members: Vec<String> },
    Registry { client: RegistryClient, repository: String, started: Arc<StartedReads> },
}

/// An image opened for reading.
pub struct SourceImage {
    pub reference: ImageRef,
    /// The image manifest (synthesized for a docker archive).
    pub manifest: Manifest,
    /// Digest of the manifest as stored, when the store has one.
    pub manifest_digest: Option<Digest>,
    /// The config document.
    pub config: Value,
    pub layers: Vec<LayerBlob>,
    backend: Backend,
}

/// Opens the image `reference` names, with default registry options.
pub fn open_source(reference: &ImageRef) -> Result<SourceImage> {
    open_source_with(reference, &RegistryOptions::default())
}

/// Opens the image `reference` names; `options` say how to reach a
/// registry and which platform to pick from an index.
pub fn open_source_with(reference: &ImageRef, options: &RegistryOptions) -> Result<SourceImage> {
    open(reference, options, None::<fn(&[LayerBlob]) -> LayerReads>).map(|(image, _)| image)
}

/// [`open_source_with`], also reading what `pick` names from the image's
/// layers ([`LayerReads`]): the whole blob from a registry side by side
/// with the config (see [`crate::remote_image::resolve_reading`]), the
/// ranges ahead started as soon as the manifest is in. The whole blob's
/// outcome is the caller's to judge.
pub fn open_source_reading(reference: &ImageRef, options: &RegistryOptions, pick: impl FnOnce(&[LayerBlob]) -> LayerReads) -> Result<(SourceImage, Option<Result<Vec<u8>>>)> {
    open(reference, options, Some(pick))
}

fn open(reference: &ImageRef, options: &RegistryOptions, pick: Option<impl FnOnce(&[LayerBlob]) -> LayerReads>) -> Result<(SourceImage, Option<Result<Vec<u8>>>)> {
    let image = match reference {
        ImageRef::Layout { dir, tag } => open_layout(reference, &OciLayout::open(dir)?, tag, options)?,
        ImageRef::DockerArchive { file } => open_archive(reference, file)?,
        ImageRef::Docker(r) => return open_registry(reference, r, options, pick),
    };
    let blob = pick.and_then(|pick| pick(&image.layers).whole).map(|(digest, max)| image.read_blob(&digest, max));
    Ok((image, blob))
}

fn layer_blobs(manifest: &Manifest) -> Result<Vec<LayerBlob>> {
    manifest
        .layers
        .iter()
        .map(|l| Ok(LayerBlob { digest: Digest::parse(&l.digest)?, media_type: l.media_type.clone(), size: l.size, annotations: l.annotations.clone().unwrap_or_default() }))
        .collect()
}

fn open_registry(
    reference: &ImageRef,
    r: &crate::docker_ref::DockerReference,
    options: &RegistryOptions,
    pick: Option<impl FnOnce(&[LayerBlob]) -> LayerReads>,
) -> Result<(SourceImage, Option<Result<Vec<u8>>>)> {
    let client = RegistryClient::for_reference(r, options)?;
    if pick.is_some() {
        // The blob and the config are read side by side once the manifest
        // is in: one of them gets a connection opened meanwhile.
        client.warm_connection();
    }
    let started = Arc::new(StartedReads::default());
    let (image, blob) = resolve_reading(&client, r, &options.platform(), |m| {
        let layers = layer_blobs(m).ok()?;
        let reads = pick?(&layers);
        if !reads.ahead.is_empty() {
            let store = registry_store(&client, &r.repository, &layers, &started);
            for range in reads.ahead {
                store.start_read(range);
            }
        }
        reads.whole
    })?;
    let layers = layer_blobs(&image.manifest)?;
    let image = SourceImage {
        reference: reference.clone(),
        manifest: image.manifest,
        manifest_digest: Some(image.manifest_digest),
        config: image.config,
        layers,
        backend: Backend::Registry { client, repository: r.repository.clone(), started },
    };
    Ok((image, blob))
}

/// The range-reading store of a registry image's blobs, their sizes from
/// `layers`, its started reads kept in `started`.
fn registry_store(client: &RegistryClient, repository: &str, layers: &[LayerBlob], started: &Arc<StartedReads>) -> RegistryBlobStore {
    RegistryBlobStore::new(client.clone(), repository).with_blob_sizes(layers.iter().map(|l| (l.digest.clone(), l.size))).with_started_reads(started.clone())
}

fn bad(reference: &ImageRef, reason: impl Into<String>) -> RegistryError {
    RegistryError::BadImage { reference: reference.to_string(), reason: reason.into() }
}

fn parse_json<T: serde::de::DeserializeOwned>(data: &[u8], what: String) -> Result<T> {
    serde_json::from_slice(data).map_err(|source| RegistryError::Json { what, source })
}

fn open_layout(reference: &ImageRef, layout: &OciLayout, tag: &str, options: &RegistryOptions) -> Result<SourceImage> {
    let platform = options.platform();
    let mut desc = layout.resolve(tag)?;
    // Follow an index to this host's platform.
    for _ in 0..4 {
        if desc.media_type != MEDIA_TYPE_OCI_INDEX && desc.media_type != MEDIA_TYPE_DOCKER_LIST {
            break;
        }
        let digest = Digest::parse(&desc.digest)?;
        let index: Index = parse_json(&layout.read_blob(&digest, MAX_JSON_SIZE)?, format!("{reference}: index {digest}"))?;
        desc = platform.select(&index.manifests).ok_or_else(|| bad(reference, format!("index {digest} has no manifest for {platform}")))?.clone();
    }
    if desc.media_type != MEDIA_TYPE_OCI_MANIFEST && desc.media_type != MEDIA_TYPE_DOCKER_MANIFEST {
        return Err(bad(reference, format!("unsupported manifest media type {:?}", desc.media_type)));
    }
    let manifest_digest = Digest::parse(&desc.digest)?;
    let manifest: Manifest = parse_json(&layout.read_blob(&manifest_digest, MAX_JSON_SIZE)?, format!("{reference}: manifest {manifest_digest}"))?;
    let config_digest = Digest::parse(&manifest.config.digest)?;
    let config: Value = parse_json(&layout.read_blob(&config_digest, MAX_JSON_SIZE)?, format!("{reference}: config {config_digest}"))?;
    let layers = layer_blobs(&manifest)?;
    Ok(SourceImage { reference: reference.clone(), manifest, manifest_digest: Some(manifest_digest), config, layers, backend: Backend::Layout(layout.clone()) })
}

fn open_archive(reference: &ImageRef, file: &std::path::Path) -> Result<SourceImage> {
    let archive = DockerArchive::open(file)?;
    let entries = archive.manifest()?;
    let entry = entries.first().ok_or_else(|| bad(reference, "manifest.json lists no image"))?;
    let config_bytes = archive.read_member(&entry.config, MAX_JSON_SIZE)?;
    let config: Value = parse_json(&config_bytes, format!("{reference}: {}", entry.config))?;
    let diff_ids: Vec<String> =
        config.pointer("/rootfs/diff_ids").and_then(Value::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
    let mut layers = Vec::new();
    for (i, member) in entry.layers.iter().enumerate() {
        let (_, size) = archive.member(member)?;
        // A member stored under its digest is verified against it; an old
        // style `<id>/layer.tar` against the config's diff_id.
        let digest = match member.strip_prefix("blobs/sha256/") {
            Some(hex) => Digest::parse(&format!("sha256:{hex}"))?,
            None => Digest::parse(diff_ids.get(i).ok_or_else(|| bad(reference, format!("config has no diff_id for layer {i}")))?)?,
        };
        layers.push(LayerBlob { digest, media_type: "application/vnd.docker.image.rootfs.diff.tar".into(), size, annotations: Default::default() });
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_OCI_MANIFEST.into()),
        config: Descriptor::new(MEDIA_TYPE_OCI_CONFIG, Digest::of(&config_bytes).as_str(), config_bytes.len() as u64),
        layers: layers.iter().map(|l| Descriptor::new(&l.media_type, l.digest.as_str(), l.size)).collect(),
        annotations: None,
        extra: Default::default(),
    };
    Ok(SourceImage { reference: reference.clone(), manifest, manifest_digest: None, config, layers, backend: Backend::Archive { archive, members: entry.layers.clone() } })
}

/// A raw layer stream plus what checks it once fully read.
pub struct LayerStream {
    reader: Option<Box<dyn Read + Send>>,
    check: DigestCheck,
    /// A second handle on the same source (sharing its position: a cloned
    /// file, or the same HTTP stream), to read what the consumer left
    /// unread, up to `limit` bytes in all.
    rest: Box<dyn Read + Send>,
    limit: u64,
}

/// One reader used through two handles, each reading where the other stopped.
struct SharedReader<R>(Arc<Mutex<R>>);

impl<R> Clone for SharedReader<R> {
    fn clone(&self) -> Self {
        SharedReader(self.0.clone())
    }
}

impl<R: Read> Read for SharedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("layer stream poisoned"))?.read(buf)
    }
}

impl LayerStream {
    /// The raw (possibly compressed) bytes of the layer. The caller reads
    /// them to the end of its stream and then calls [`LayerStream::finish`].
    pub fn take_reader(&mut self) -> Box<dyn Read + Send> {
        self.reader.take().unwrap_or_else(|| Box::new(std::io::empty()))
    }

    /// Reads whatever the consumer left unread, then verifies the digest.
    pub fn finish(mut self) -> Result<()> {
        let io = |source| RegistryError::Io { path: "layer".into(), source };
        if let Some(mut r) = self.reader.take() {
            std::io::copy(&mut r, &mut std::io::sink()).map_err(io)?;
        }
        let remaining = self.limit.saturating_sub(self.check.bytes());
        let mut rest = (&mut self.rest).take(remaining);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = rest.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            self.check.update(&buf[..n]);
        }
        self.check.verify()
    }
}

impl SourceImage {
    /// The config's `config` object (Entrypoint, Cmd, Env, ...), if any.
    pub fn runtime_config(&self) -> Option<&Value> {
        self.config.get("config")
    }

    /// Opens layer `i` for streaming. The bytes are the blob as stored
    /// (compressed or not); [`LayerStream::finish`] verifies the digest.
    pub fn open_layer(&self, i: usize) -> Result<LayerStream> {
        let layer = self.layers.get(i).ok_or_else(|| bad(&self.reference, format!("no layer {i}")))?;
        let (file, limit) = match &self.backend {
            Backend::Layout(layout) => (layout.open_blob(&layer.digest)?, u64::MAX),
            Backend::Archive { archive, members } => {
                let member = members.get(i).ok_or_else(|| bad(&self.reference, format!("no layer {i}")))?;
                let (pos, size) = archive.member(member)?;
                let mut f = File::open(&archive.path).at(&archive.path)?;
                f.seek(SeekFrom::Start(pos)).at(&archive.path)?;
                (f, size)
            }
            Backend::Registry { client, repository, .. } => {
                let stream = SharedReader(Arc::new(Mutex::new(BlobStream::open(client, repository, &layer.digest, layer.size)?)));
                let (reader, check) = DigestReader::new(stream.clone(), layer.digest.clone());
                return Ok(LayerStream { reader: Some(Box::new(reader)), check, rest: Box::new(stream), limit: layer.size });
            }
        };
        let rest = file.try_clone().map_err(|e| RegistryError::Io { path: "layer".into(), source: e })?;
        let (reader, check) = DigestReader::new(file.take(limit), layer.digest.clone());
        Ok(LayerStream { reader: Some(Box::new(reader)), check, rest: Box::new(rest), limit })
    }

    /// Reads a whole blob of the image (config, bootstrap, ...) of at most
    /// `max` bytes, verified against its digest.
    pub fn read_blob(&self, digest: &Digest, max: u64) -> Result<Vec<u8>> {
        match &self.backend {
            Backend::Layout(layout) => layout.read_blob(digest, max),
            Backend::Registry { client, repository, .. } => client.get_blob(repository, digest, max),
            Backend::Archive { .. } => Err(bad(&self.reference, "blobs of a docker archive are read as layers only")),
        }
    }

    /// Random access to the image's blobs: the layout's files, or range
    /// requests to the registry (blob sizes taken from the manifest), which
    /// serve reads within the ranges started ahead from those reads.
    pub fn blob_store(&self) -> Result<Arc<dyn BlobStore>> {
        match &self.backend {
            Backend::Layout(layout) => Ok(Arc::new(LayoutBlobStore::new(layout.clone()))),
            Backend::Registry { client, repository, started } => Ok(Arc::new(registry_store(client, repository, &self.layers, started))),
            Backend::Archive { .. } => Err(bad(&self.reference, "a docker archive cannot be read at random; convert it first")),
        }
    }

    /// The registry client the image was opened with, if it is in a registry.
    pub fn registry_client(&self) -> Option<&RegistryClient> {
        match &self.backend {
            Backend::Registry { client, .. } => Some(client),
            _ => None,
        }
    }
}
