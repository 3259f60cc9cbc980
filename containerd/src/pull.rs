//! [`pull`]: `naiad pull --containerd SOCKET [--namespace NS] REF`, a lazy
//! pull for plain containerd users, who have no CRI (as stargz's `ctr-remote
//! image rpull`). It puts the manifest and config in containerd's content
//! store, prepares each layer's snapshot through containerd with the labels
//! the CRI plugin would set (so the naiad snapshotter answers each one
//! "already exists" and mounts the image), and creates the image. After it,
//! `ctr run --snapshotter naiad REF ID CMD` works.
//!
//! Everything is done under a containerd lease, so the garbage collector
//! cannot take the new content or snapshots before the image holds them;
//! the config carries the `containerd.io/gc.ref.snapshot.<snapshotter>`
//! label that keeps the snapshot chain alive afterwards, as containerd's
//! own unpacker sets it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient, CreateImageRequest, CreateRequest, DeleteRequest, Image, Info as ContentInfo,
    UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request};
use containerd_client::types::Descriptor;
use naiad_format::oci::{ANNOTATION_FORMAT, MEDIA_TYPE_BLOB, MEDIA_TYPE_BOOTSTRAP};
use naiad_registry::{remote_image, Digest, DockerReference, RegistryClient, RegistryOptions};
use sha2::Digest as _;

use crate::error::SnapshotterError;
use crate::layer_role::{LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST, LABEL_TARGET};

/// Largest config blob read.
const MAX_CONFIG: u64 = 16 << 20;

/// What to pull and where.
pub struct PullRequest {
    /// containerd's socket.
    pub socket: PathBuf,
    pub namespace: String,
    /// The naiad image (`HOST/REPO:TAG`).
    pub reference: DockerReference,
    pub registry: RegistryOptions,
    /// The snapshotter's name in containerd's config (`naiad`).
    pub snapshotter: String,
}

/// What a pull created.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The image's name in containerd.
    pub name: String,
    pub manifest_digest: String,
    /// The chain id of the top layer: the image's root snapshot.
    pub chain_id: String,
    pub layers: usize,
}

/// The manifest, its exact bytes, the config's, and the layers' diff ids.
struct Resolved {
    manifest_bytes: Vec<u8>,
    manifest_digest: Digest,
    manifest_media_type: String,
    config_bytes: Vec<u8>,
    config_digest: String,
    layers: Vec<String>,
    diff_ids: Vec<String>,
}

fn image_error(reference: &DockerReference, reason: impl Into<String>) -> SnapshotterError {
    SnapshotterError::Image { image: format!("docker://{reference}"), reason: reason.into() }
}

/// Fetches and checks what the pull needs from the registry (blocking).
fn resolve(reference: &DockerReference, options: &RegistryOptions) -> Result<Resolved, SnapshotterError> {
    let client = RegistryClient::for_reference(reference, options).map_err(|e| image_error(reference, e.to_string()))?;
    let platform = options.platform();
    let remote = remote_image::resolve(&client, reference, &platform).map_err(|e| image_error(reference, e.to_string()))?;
    let m = &remote.manifest;
    if m.annotations.as_ref().and_then(|a| a.get(ANNOTATION_FORMAT)).is_none() {
        return Err(image_error(reference, "not a naiad image (no org.naiad.format annotation); convert it with `naiad convert`, or pull it with `ctr image pull`"));
    }
    for l in &m.layers {
        if l.media_type != MEDIA_TYPE_BLOB && l.media_type != MEDIA_TYPE_BOOTSTRAP {
            return Err(image_error(reference, format!("layer {} has media type {}, not a naiad layer", l.digest, l.media_type)));
        }
    }
    let config_digest = Digest::parse(&m.config.digest).map_err(|e| image_error(reference, format!("config digest: {e}")))?;
    let config_bytes = client.get_blob(&reference.repository, &config_digest, MAX_CONFIG).map_err(|e| image_error(reference, e.to_string()))?;
    let diff_ids: Vec<String> = remote.config["rootfs"]["diff_ids"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
    if diff_ids.len() != m.layers.len() {
        return Err(image_error(reference, format!("the config lists {} diff_ids for {} layers", diff_ids.len(), m.layers.len())));
    }
    Ok(Resolved {
        manifest_media_type: m.media_type.clone().unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into()),
        manifest_bytes: remote.manifest_bytes.clone(),
        manifest_digest: remote.manifest_digest.clone(),
        config_bytes,
        config_digest: m.config.digest.clone(),
        layers: m.layers.iter().map(|l| l.digest.clone()).collect(),
        diff_ids,
    })
}

/// containerd's chain ids: the first is the first diff id, each next one
/// the sha256 of "PARENT DIFF".
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => {
                let h = sha2::Sha256::digest(format!("{parent} {d}").as_bytes());
                format!("sha256:{}", h.iter().map(|b| format!("{b:02x}")).collect::<String>())
            }
        };
        out.push(next);
    }
    out
}

/// A request in `namespace` under `lease`.
fn request<T>(body: T, namespace: &str, lease: &str) -> Request<T> {
    let mut req = Request::new(body);
    let md = req.metadata_mut();
    if let Ok(v) = namespace.parse() {
        md.insert("containerd-namespace", v);
    }
    if let Ok(v) = lease.parse() {
        md.insert("containerd-lease", v);
    }
    req
}

struct Session<'a> {
    channel: Channel,
    namespace: &'a str,
    lease: String,
    socket: &'a Path,
}

impl Session<'_> {
    fn fail(&self, what: &str, status: containerd_client::tonic::Status) -> SnapshotterError {
        SnapshotterError::Containerd { socket: self.socket.to_path_buf(), reason: format!("{what}: {}", status.message()) }
    }

    /// Writes `data` as content `digest` with `labels` (kept, labels
    /// updated, if it is there already).
    async fn write_content(&self, digest: &str, data: &[u8], labels: HashMap<String, String>) -> Result<(), SnapshotterError> {
        let mut client = ContentClient::new(self.channel.clone());
        let base = WriteContentRequest { r#ref: format!("naiad-pull-{digest}"), total: data.len() as i64, expected: digest.to_string(), ..Default::default() };
        let messages = vec![
            WriteContentRequest { action: WriteAction::Write as i32, offset: 0, data: data.to_vec(), ..base.clone() },
            WriteContentRequest { action: WriteAction::Commit as i32, offset: data.len() as i64, labels: labels.clone(), ..base },
        ];
        match client.write(request(futures::stream::iter(messages), self.namespace, &self.lease)).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                while let Some(r) = stream.message().await.transpose() {
                    if let Err(s) = r {
                        if s.code() != Code::AlreadyExists {
                            return Err(self.fail(&format!("writing content {digest}"), s));
                        }
                    }
                }
            }
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(self.fail(&format!("writing content {digest}"), s)),
        }
        // Present before or not: make sure the labels are on it.
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let info = ContentInfo { digest: digest.to_string(), labels, ..Default::default() };
        client
            .update(request(UpdateRequest { info: Some(info), update_mask: Some(prost_types::FieldMask { paths }) }, self.namespace, &self.lease))
            .await
            .map_err(|s| self.fail(&format!("labelling content {digest}"), s))?;
        Ok(())
    }
}

/// Pulls `req.reference` into containerd lazily.
pub async fn pull(req: PullRequest) -> Result<Pulled, SnapshotterError> {
    let (reference, options) = (req.reference.clone(), req.registry.clone());
    let resolved = tokio::task::spawn_blocking(move || resolve(&reference, &options)).await.map_err(|e| image_error(&req.reference, format!("resolving failed: {e}")))??;
    let socket = req.socket.as_path();
    let channel = containerd_client::connect(socket).await.map_err(|e| SnapshotterError::Containerd { socket: socket.to_path_buf(), reason: format!("cannot connect: {e}") })?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let lease = format!("naiad-pull-{nanos}");
    let session = Session { channel: channel.clone(), namespace: &req.namespace, lease: lease.clone(), socket };
    let mut leases = LeasesClient::new(channel.clone());
    // The lease expires by itself should this process die midway.
    let expire = HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339_in(3600))]);
    leases
        .create(request(CreateRequest { id: lease.clone(), labels: expire }, &req.namespace, ""))
        .await
        .map_err(|s| session.fail("creating a lease (is the socket containerd's?)", s))?;
    let result = pull_under_lease(&req, &session, &resolved).await;
    let _ = leases.delete(request(DeleteRequest { id: lease.clone(), sync: false }, &req.namespace, "")).await;
    result
}

async fn pull_under_lease(req: &PullRequest, session: &Session<'_>, r: &Resolved) -> Result<Pulled, SnapshotterError> {
    let chains = chain_ids(&r.diff_ids);
    let top = chains.last().cloned().ok_or_else(|| image_error(&req.reference, "the image has no layers"))?;
    let name = req.reference.to_string();
    let image_ref = req.reference.with_tag(req.reference.tag_or_latest()).to_string();

    // Content: the config keeps the snapshot chain, the manifest its config.
    session.write_content(&r.config_digest, &r.config_bytes, HashMap::from([(format!("containerd.io/gc.ref.snapshot.{}", req.snapshotter), top.clone())])).await?;
    let mut labels = HashMap::from([("containerd.io/gc.ref.content.config".to_string(), r.config_digest.clone())]);
    labels.insert(format!("containerd.io/distribution.source.{}", req.reference.registry), req.reference.repository.clone());
    session.write_content(r.manifest_digest.as_str(), &r.manifest_bytes, labels).await?;

    // Snapshots, bottom up: each must be answered "already exists".
    let mut snapshots = SnapshotsClient::new(session.channel.clone());
    let mut parent = String::new();
    for (i, (layer, chain)) in r.layers.iter().zip(&chains).enumerate() {
        let labels = HashMap::from([
            (LABEL_TARGET.to_string(), chain.clone()),
            (LABEL_IMAGE_REF.to_string(), image_ref.clone()),
            (LABEL_MANIFEST_DIGEST.to_string(), r.manifest_digest.to_string()),
            (LABEL_LAYER_DIGEST.to_string(), layer.clone()),
            (LABEL_IMAGE_LAYERS.to_string(), r.layers[i..].join(",")),
        ]);
        let key = format!("extract-naiad-{} {chain}", session.lease);
        let prepared = snapshots
            .prepare(request(PrepareSnapshotRequest { snapshotter: req.snapshotter.clone(), key: key.clone(), parent: parent.clone(), labels }, session.namespace, &session.lease))
            .await;
        match prepared {
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(session.fail(&format!("preparing layer {layer} with snapshotter {}", req.snapshotter), s)),
            Ok(_) => {
                let _ = snapshots.remove(request(RemoveSnapshotRequest { snapshotter: req.snapshotter.clone(), key }, session.namespace, &session.lease)).await;
                return Err(SnapshotterError::Containerd {
                    socket: session.socket.to_path_buf(),
                    reason: format!("snapshotter {:?} did not serve layer {layer} remotely: is it naiad's (`naiad snapshotter`) in containerd's proxy_plugins?", req.snapshotter),
                });
            }
        }
        parent = chain.clone();
    }

    // The image.
    let target = Descriptor { media_type: r.manifest_media_type.clone(), digest: r.manifest_digest.to_string(), size: r.manifest_bytes.len() as i64, annotations: HashMap::new() };
    let image = Image { name: name.clone(), target: Some(target), ..Default::default() };
    let mut images = ImagesClient::new(session.channel.clone());
    match images.create(request(CreateImageRequest { image: Some(image.clone()) }, session.namespace, &session.lease)).await {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            let mask = prost_types::FieldMask { paths: vec!["target".into()] };
            images
                .update(request(UpdateImageRequest { image: Some(image), update_mask: Some(mask) }, session.namespace, &session.lease))
                .await
                .map_err(|s| session.fail(&format!("updating image {name}"), s))?;
        }
        Err(s) => return Err(session.fail(&format!("creating image {name}"), s)),
    }
    Ok(Pulled { name, manifest_digest: r.manifest_digest.to_string(), chain_id: top, layers: r.layers.len() })
}

/// Now plus `secs`, as RFC 3339 UTC (`2026-12-02T15:04:05Z`).
fn rfc3339_in(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now() + std::time::Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_are_containerds() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let chains = chain_ids(&[d('a'), d('b')]);
        assert_eq!(chains[0], d('a'));
        let expected = sha2::Sha256::digest(format!("{} {}", d('a'), d('b')).as_bytes());
        assert_eq!(chains[1], format!("sha256:{}", expected.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    }

    #[test]
    fn lease_expiry_is_rfc3339() {
        let s = rfc3339_in(0);
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
        assert!(s.starts_with("20"), "{s}");
    }
}
