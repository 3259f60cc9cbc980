//! Pushing an image from an OCI layout to a registry: every blob the
//! manifest names (config first, then layers), then the manifest under the
//! destination's tag. The manifest is pushed byte for byte, so its digest
//! is the one the layout has.

use serde::Serialize;

use crate::blob_upload::BlobPushOutcome;
use crate::digest::Digest;
use crate::docker_ref::DockerReference;
use crate::error::{RegistryError, Result};
use crate::layout::{OciLayout, MAX_JSON_SIZE};
use crate::manifest::{Manifest, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_MANIFEST};
use crate::registry_client::RegistryClient;
use crate::registry_options::RegistryOptions;

/// What a push did; part of `naiad convert --json` for a docker:// destination.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushSummary {
    pub destination: String,
    pub manifest_digest: String,
    pub blobs_existing: usize,
    pub blobs_mounted: usize,
    pub blobs_uploaded: usize,
    /// Blobs among the uploaded ones sent in PATCH chunks.
    pub blobs_chunked: usize,
    pub bytes_uploaded: u64,
    /// Requests retried after a failure.
    pub retries: u64,
}

/// Pushes `layout:tag` to `destination`. `mount_from` are images of other
/// repositories whose blobs may be mounted instead of uploaded (the source
/// image and chunk dictionaries of a conversion); those on another registry
/// are ignored.
pub fn push_image(layout: &OciLayout, tag: &str, destination: &DockerReference, options: &RegistryOptions, mount_from: &[&DockerReference]) -> Result<PushSummary> {
    let client = RegistryClient::for_reference(destination, options)?;
    push_image_with(&client, layout, tag, destination, mount_from)
}

/// [`push_image`] with an existing client for the destination's registry.
pub fn push_image_with(client: &RegistryClient, layout: &OciLayout, tag: &str, destination: &DockerReference, mount_from: &[&DockerReference]) -> Result<PushSummary> {
    let desc = layout.resolve(tag)?;
    if desc.media_type != MEDIA_TYPE_OCI_MANIFEST && desc.media_type != MEDIA_TYPE_DOCKER_MANIFEST {
        return Err(RegistryError::BadImage {
            reference: format!("oci:{}:{tag}", layout.dir().display()),
            reason: format!("only image manifests can be pushed, not {:?}", desc.media_type),
        });
    }
    let manifest_digest = Digest::parse(&desc.digest)?;
    let manifest_bytes = layout.read_blob(&manifest_digest, MAX_JSON_SIZE)?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(|source| RegistryError::Json { what: format!("manifest {manifest_digest}"), source })?;
    let repo = &destination.repository;
    let mut from: Vec<&str> = mount_from.iter().filter(|m| m.registry == destination.registry && m.repository != destination.repository).map(|m| m.repository.as_str()).collect();
    from.dedup();
    let mut summary = PushSummary { destination: format!("docker://{destination}"), manifest_digest: manifest_digest.to_string(), ..Default::default() };
    let before = client.stats().retries;
    for blob in std::iter::once(&manifest.config).chain(manifest.layers.iter()) {
        let digest = Digest::parse(&blob.digest)?;
        let path = layout.blob_path(&digest);
        let outcome = client.push_blob(repo, &digest, blob.size, &path, &from)?;
        tracing::debug!("push {destination}: blob {digest} ({} bytes): {outcome:?}", blob.size);
        match outcome {
            BlobPushOutcome::Existed => summary.blobs_existing += 1,
            BlobPushOutcome::Mounted => summary.blobs_mounted += 1,
            BlobPushOutcome::UploadedWhole | BlobPushOutcome::UploadedChunked(_) => {
                summary.blobs_uploaded += 1;
                summary.bytes_uploaded += blob.size;
                if matches!(outcome, BlobPushOutcome::UploadedChunked(_)) {
                    summary.blobs_chunked += 1;
                }
            }
        }
    }
    let reference = match (&destination.tag, &destination.digest) {
        (Some(t), _) => t.clone(),
        (None, Some(d)) if *d == manifest_digest => d.to_string(),
        (None, Some(d)) => {
            return Err(RegistryError::BadReference {
                reference: format!("docker://{destination}"),
                reason: format!("the image's manifest is {manifest_digest}, not {d}; push to a tag"),
            })
        }
        (None, None) => "latest".to_string(),
    };
    client.put_manifest(repo, &reference, &desc.media_type, &manifest_bytes)?;
    summary.retries = client.stats().retries - before;
    Ok(summary)
}
