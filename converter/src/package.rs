//! Packaging a converted image as an OCI image in a layout: the chunk blobs
//! and the zstd-compressed bootstrap as layers, the source config carried
//! over, and naiad's media types and annotations (SPEC.md, "OCI packaging").

use naiad_format::oci::*;
use naiad_format::BlobRecord;
use naiad_registry::manifest::{Descriptor, Manifest, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST};
use naiad_registry::{Digest, OciLayout};
use serde_json::{json, Value};

use crate::error::{ConvertError, Result};

/// What was written for the image.
pub struct Packaged {
    pub manifest: Descriptor,
    pub bootstrap_layer_size: u64,
    pub written: Vec<Digest>,
}

/// Writes bootstrap, config and manifest blobs (not the tag).
/// `startup_set` is the prefetch blob's index and how many bytes at its
/// start hold the startup set (annotated on its layer).
pub fn package(
    layout: &OciLayout,
    bootstrap: &[u8],
    blobs: &[BlobRecord],
    startup_set: Option<(usize, u64)>,
    source_config: &Value,
    source_digest: Option<&Digest>,
) -> Result<Packaged> {
    let compressed = zstd::bulk::compress(bootstrap, 10).map_err(|source| ConvertError::Io { path: "bootstrap".into(), source })?;
    let boot_digest = layout.write_blob(&compressed)?;
    let raw_digest = Digest::of(bootstrap);

    let mut layers: Vec<Descriptor> = blobs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let layer =
                Descriptor::new(MEDIA_TYPE_BLOB, &b.digest_string(), b.size).with_annotation(ANNOTATION_LAYER_KIND, "blob").with_annotation(ANNOTATION_BLOB_INDEX, &i.to_string());
            match startup_set {
                Some((set_blob, bytes)) if set_blob == i => layer.with_annotation(ANNOTATION_STARTUP_SET, &bytes.to_string()),
                _ => layer,
            }
        })
        .collect();
    layers.push(
        Descriptor::new(MEDIA_TYPE_BOOTSTRAP, boot_digest.as_str(), compressed.len() as u64)
            .with_annotation(ANNOTATION_LAYER_KIND, "bootstrap")
            .with_annotation(ANNOTATION_BOOTSTRAP_DIGEST, raw_digest.as_str()),
    );

    // The config keeps everything that says how to run the image; its
    // rootfs describes naiad's layers (blobs are stored uncompressed as a
    // whole, so their diff_id is their digest; the bootstrap's is that of
    // the uncompressed file). History no longer matches the layers.
    let mut config = source_config.clone();
    if !config.is_object() {
        config = json!({});
    }
    let mut diff_ids: Vec<Value> = blobs.iter().map(|b| Value::String(b.digest_string())).collect();
    diff_ids.push(Value::String(raw_digest.to_string()));
    config["rootfs"] = json!({ "type": "layers", "diff_ids": diff_ids });
    if let Some(obj) = config.as_object_mut() {
        obj.remove("history");
    }
    let config_bytes = serde_json::to_vec(&config).map_err(|e| ConvertError::Invalid(format!("config: {e}")))?;
    let config_digest = layout.write_blob(&config_bytes)?;

    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(ANNOTATION_FORMAT.to_string(), FORMAT_VERSION.to_string());
    if let Some(d) = source_digest {
        annotations.insert(ANNOTATION_SOURCE_DIGEST.to_string(), d.to_string());
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_OCI_MANIFEST.into()),
        config: Descriptor::new(MEDIA_TYPE_OCI_CONFIG, config_digest.as_str(), config_bytes.len() as u64),
        layers,
        annotations: Some(annotations),
        extra: Default::default(),
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| ConvertError::Invalid(format!("manifest: {e}")))?;
    let manifest_digest = layout.write_blob(&manifest_bytes)?;
    Ok(Packaged {
        manifest: Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, manifest_digest.as_str(), manifest_bytes.len() as u64),
        bootstrap_layer_size: compressed.len() as u64,
        written: vec![boot_digest, config_digest, manifest_digest],
    })
}
