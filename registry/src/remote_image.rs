//! Resolving a registry reference to one image: its manifest (following an
//! OCI image index or Docker manifest list to the wanted platform) and its
//! config, every document verified against its digest.

use serde_json::Value;

use crate::digest::Digest;
use crate::docker_ref::DockerReference;
use crate::error::{RegistryError, Result};
use crate::layout::MAX_JSON_SIZE;
use crate::manifest::*;
use crate::platform::Platform;
use crate::registry_client::{FetchedManifest, RegistryClient};

const DOCKER_SCHEMA1: &[&str] = &["application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws"];

/// An image manifest and config as pulled.
pub struct RemoteImage {
    pub manifest: Manifest,
    pub manifest_digest: Digest,
    /// The manifest exactly as the registry sent it.
    pub manifest_bytes: Vec<u8>,
    pub config: Value,
}

fn is_index(m: &FetchedManifest) -> bool {
    if m.media_type == MEDIA_TYPE_OCI_INDEX || m.media_type == MEDIA_TYPE_DOCKER_LIST {
        return true;
    }
    // An OCI index may leave out mediaType; it has manifests and no config.
    m.media_type.is_empty() && serde_json::from_slice::<Value>(&m.bytes).ok().is_some_and(|v| v.get("manifests").is_some() && v.get("config").is_none())
}

/// Pulls `reference`'s manifest for `platform` and its config.
pub fn resolve(client: &RegistryClient, reference: &DockerReference, platform: &Platform) -> Result<RemoteImage> {
    resolve_reading(client, reference, platform, |_| None).map(|(image, _)| image)
}

/// [`resolve`], also reading the blob `pick` names (its digest and the
/// most bytes to read) once the manifest is known: the blob on this
/// thread, on the connection the manifest came over, and the config side
/// by side on another, which saves a round trip over a slow link. The
/// blob's outcome is the caller's to judge.
pub fn resolve_reading(
    client: &RegistryClient,
    reference: &DockerReference,
    platform: &Platform,
    pick: impl FnOnce(&Manifest) -> Option<(Digest, u64)>,
) -> Result<(RemoteImage, Option<Result<Vec<u8>>>)> {
    let shown = format!("docker://{reference}");
    let bad = |reason: String| RegistryError::BadImage { reference: shown.clone(), reason };
    let repo = &reference.repository;
    let mut fetched = client.get_manifest(repo, &reference.manifest_reference())?;
    for _ in 0..4 {
        if !is_index(&fetched) {
            break;
        }
        let index: Index = serde_json::from_slice(&fetched.bytes).map_err(|source| RegistryError::Json { what: format!("{shown}: index {}", fetched.digest), source })?;
        let entry = platform.select(&index.manifests).ok_or_else(|| {
            let available: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.get("os").and_then(Value::as_str).unwrap_or("?"), p.get("architecture").and_then(Value::as_str).unwrap_or("?")))
                .collect();
            bad(format!("index {} has no manifest for {platform} (it has: {})", fetched.digest, if available.is_empty() { "none".into() } else { available.join(", ") }))
        })?;
        let digest = Digest::parse(&entry.digest)?;
        tracing::debug!("{}: index {} -> {platform} manifest {digest}", shown, fetched.digest);
        fetched = client.get_manifest(repo, digest.as_str())?;
        if fetched.digest != digest {
            return Err(RegistryError::ManifestDigestMismatch { reference: format!("{shown}@{digest}"), expected: digest.to_string(), actual: fetched.digest.to_string() });
        }
    }
    if DOCKER_SCHEMA1.contains(&fetched.media_type.as_str()) {
        return Err(bad("Docker schema 1 manifests are not supported (push the image again with a current docker or skopeo)".into()));
    }
    if is_index(&fetched) {
        return Err(bad("nested image indexes deeper than 4 levels".into()));
    }
    let manifest: Manifest = serde_json::from_slice(&fetched.bytes).map_err(|source| RegistryError::Json { what: format!("{shown}: manifest {}", fetched.digest), source })?;
    let media_type = manifest.media_type.clone().unwrap_or_else(|| fetched.media_type.clone());
    if media_type != MEDIA_TYPE_OCI_MANIFEST && media_type != MEDIA_TYPE_DOCKER_MANIFEST && !media_type.is_empty() {
        return Err(bad(format!("unsupported manifest media type {media_type:?}")));
    }
    let config_digest = Digest::parse(&manifest.config.digest)?;
    let fetch_config = || -> Result<Value> {
        let config_bytes = client.get_blob(repo, &config_digest, MAX_JSON_SIZE)?;
        serde_json::from_slice(&config_bytes).map_err(|source| RegistryError::Json { what: format!("{shown}: config {config_digest}"), source })
    };
    let (config, blob) = match pick(&manifest) {
        None => (fetch_config(), None),
        Some((digest, max)) => std::thread::scope(|s| {
            let config = s.spawn(fetch_config);
            let blob = client.get_blob(repo, &digest, max);
            (config.join().unwrap_or_else(|_| Err(bad(format!("config {config_digest}: the reading thread panicked")))), Some(blob))
        }),
    };
    Ok((RemoteImage { manifest, manifest_digest: fetched.digest, manifest_bytes: fetched.bytes, config: config? }, blob))
}
