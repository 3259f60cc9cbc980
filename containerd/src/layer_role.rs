//! [`LayerRole`]: what a layer containerd asks to prepare is, told from
//! the labels containerd's CRI plugin (or `naiad pull --containerd`) puts
//! on it: the image reference, the manifest digest and the layer digest.
//! The manifest is fetched once per digest and remembered; a naiad image is
//! one whose manifest carries naiad's format annotation.

use std::collections::HashMap;
use std::sync::Mutex;

use naiad_format::oci::{ANNOTATION_FORMAT, FORMAT_VERSION, MEDIA_TYPE_BLOB, MEDIA_TYPE_BOOTSTRAP};
use naiad_registry::manifest::Manifest;
use naiad_registry::{Digest, DockerReference, RegistryClient, RegistryOptions};

use crate::error::SnapshotterError;

/// The label naming the snapshot a prepared layer becomes.
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Set on the snapshots naiad serves remotely.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/naiad.remote";

/// What one layer of one image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerRole {
    /// An ordinary layer: containerd unpacks it into the snapshot.
    Ordinary,
    /// A naiad chunk blob: nothing to unpack.
    NaiadBlob,
    /// The naiad bootstrap: the image is mounted from `source`
    /// (`docker://HOST/REPO@MANIFEST`).
    NaiadBootstrap { source: String },
}

/// The layer a Prepare's labels name, if they name one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLabels {
    pub image_ref: String,
    pub manifest_digest: String,
    pub layer_digest: String,
}

impl LayerLabels {
    pub fn from_labels(labels: &HashMap<String, String>) -> Option<Self> {
        Some(LayerLabels {
            image_ref: labels.get(LABEL_IMAGE_REF)?.clone(),
            manifest_digest: labels.get(LABEL_MANIFEST_DIGEST)?.clone(),
            layer_digest: labels.get(LABEL_LAYER_DIGEST)?.clone(),
        })
    }
}

/// What a manifest says of its layers, remembered per manifest digest.
#[derive(Debug, Clone)]
enum ImageKind {
    Ordinary,
    /// Layer digest to role.
    Naiad(HashMap<String, LayerRole>),
}

/// Tells layer roles, fetching each manifest once.
pub struct LayerRoles {
    options: RegistryOptions,
    known: Mutex<HashMap<String, ImageKind>>,
}

impl LayerRoles {
    pub fn new(options: RegistryOptions) -> Self {
        LayerRoles { options, known: Mutex::new(HashMap::new()) }
    }

    /// The role of `layer` (blocking: may fetch the manifest).
    pub fn role(&self, layer: &LayerLabels) -> Result<LayerRole, SnapshotterError> {
        let shown = format!("{}@{}", layer.image_ref, layer.manifest_digest);
        let bad = |reason: String| SnapshotterError::Image { image: shown.clone(), reason };
        let known = self.known.lock().map(|k| k.get(&layer.manifest_digest).cloned()).unwrap_or(None);
        let kind = match known {
            Some(k) => k,
            None => {
                let digest = Digest::parse(&layer.manifest_digest).map_err(|e| bad(format!("bad manifest digest label: {e}")))?;
                let mut reference = DockerReference::parse(&layer.image_ref).map_err(|e| bad(e.to_string()))?;
                reference.tag = None;
                reference.digest = Some(digest.clone());
                let client = RegistryClient::for_reference(&reference, &self.options).map_err(|e| bad(e.to_string()))?;
                let fetched = client.get_manifest(&reference.repository, digest.as_str()).map_err(|e| bad(e.to_string()))?;
                let kind = classify(&fetched.bytes, &format!("docker://{reference}")).map_err(bad)?;
                if let Ok(mut k) = self.known.lock() {
                    k.insert(layer.manifest_digest.clone(), kind.clone());
                }
                kind
            }
        };
        match kind {
            ImageKind::Ordinary => Ok(LayerRole::Ordinary),
            ImageKind::Naiad(layers) => layers.get(&layer.layer_digest).cloned().ok_or_else(|| bad(format!("the manifest has no layer {}", layer.layer_digest))),
        }
    }
}

/// Reads a manifest: ordinary, or naiad with each layer's role.
fn classify(manifest: &[u8], source: &str) -> Result<ImageKind, String> {
    let m: Manifest = serde_json::from_slice(manifest).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
    let Some(version) = m.annotations.as_ref().and_then(|a| a.get(ANNOTATION_FORMAT)) else {
        return Ok(ImageKind::Ordinary);
    };
    if version != FORMAT_VERSION {
        return Err(format!("naiad format {version} is not supported (this naiad reads format {FORMAT_VERSION})"));
    }
    let mut roles = HashMap::new();
    for layer in &m.layers {
        let role = match layer.media_type.as_str() {
            MEDIA_TYPE_BLOB => LayerRole::NaiadBlob,
            MEDIA_TYPE_BOOTSTRAP => LayerRole::NaiadBootstrap { source: source.to_string() },
            other => return Err(format!("naiad image has a layer of media type {other}")),
        };
        roles.insert(layer.digest.clone(), role);
    }
    if !roles.values().any(|r| matches!(r, LayerRole::NaiadBootstrap { .. })) {
        return Err("naiad image has no bootstrap layer".into());
    }
    Ok(ImageKind::Naiad(roles))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_told_apart() {
        let ordinary = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aa","size":1},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:bb","size":2}]}"#;
        assert!(matches!(classify(ordinary, "s"), Ok(ImageKind::Ordinary)));
        let naiad = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aa","size":1}},"layers":[{{"mediaType":"{MEDIA_TYPE_BLOB}","digest":"sha256:b1","size":2}},{{"mediaType":"{MEDIA_TYPE_BOOTSTRAP}","digest":"sha256:b2","size":3}}],"annotations":{{"{ANNOTATION_FORMAT}":"{FORMAT_VERSION}"}}}}"#
        );
        let Ok(ImageKind::Naiad(roles)) = classify(naiad.as_bytes(), "docker://h/r@sha256:cc") else { panic!("naiad manifest") };
        assert_eq!(roles["sha256:b1"], LayerRole::NaiadBlob);
        assert_eq!(roles["sha256:b2"], LayerRole::NaiadBootstrap { source: "docker://h/r@sha256:cc".into() });
        let future = naiad.replace(&format!("\"{FORMAT_VERSION}\"}}}}"), "\"99\"}}");
        assert!(classify(future.as_bytes(), "s").unwrap_err().contains("format 99"));
        assert!(classify(b"{", "s").unwrap_err().contains("not valid JSON"));
    }
}
