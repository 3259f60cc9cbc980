//! [`NaiadSnapshotter`]: containerd's snapshots API over naiad images and
//! ordinary layers alike.
//!
//! - **A naiad layer** containerd asks to prepare for an image pull (the
//!   Prepare carries the target snapshot name in `containerd.io/snapshot.ref`
//!   and the CRI labels naming image, manifest and layer): a chunk blob
//!   becomes an empty committed snapshot; the bootstrap becomes a committed
//!   snapshot served by the image's naiad mount ([`ImageMounts`]). Both are
//!   answered "already exists", so containerd downloads nothing.
//! - **An ordinary layer** gets a directory (`ROOT/snapshots/ID/fs`) that
//!   containerd unpacks into and commits, as with its overlayfs snapshotter.
//! - **A container** (an active snapshot on top) is an overlay: its own
//!   upper directory over the parent chain's directories, where a naiad
//!   image snapshot stands for the whole image below it.
//!
//! State lives in [`Metadata`]; every method runs its blocking work
//! (database, registry, mounts, file trees) on tokio's blocking pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Snapshotter, Usage};
use futures::stream::BoxStream;

use crate::config::SnapshotterConfig;
use crate::error::{IoContext, SnapshotterError};
use crate::image_mounts::{mountpoint_for, ImageMounts};
use crate::layer_role::{LayerLabels, LayerRole, LayerRoles, LABEL_REMOTE, LABEL_TARGET};
use crate::metadata::{Content, Kind, Metadata, Record};

/// Deepest parent chain followed.
const MAX_CHAIN: usize = 4096;

pub struct NaiadSnapshotter {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    meta: Metadata,
    roles: LayerRoles,
    mounts: ImageMounts,
}

impl NaiadSnapshotter {
    /// Opens the state under `config.root` and makes sure every image
    /// snapshot's mount is served (blocking: call before serving).
    pub fn open(config: SnapshotterConfig, exe: PathBuf) -> Result<Self, SnapshotterError> {
        let root = config.root.clone();
        for dir in [root.clone(), root.join("snapshots"), root.join("mounts"), config.run_dir()] {
            std::fs::create_dir_all(&dir).at(&dir)?;
        }
        let meta = Metadata::open(&root.join("metadata.redb"))?;
        let roles = LayerRoles::new(config.registry_options().map_err(|reason| SnapshotterError::Config { path: root.clone(), reason })?);
        let inner = Inner { root, meta, roles, mounts: ImageMounts::new(config, exe) };
        inner.reattach();
        Ok(NaiadSnapshotter { inner: Arc::new(inner) })
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T, SnapshotterError> + Send + 'static) -> Result<T, SnapshotterError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| SnapshotterError::Database(format!("worker failed: {e}")))?
    }
}

fn info(name: &str, r: &Record) -> Info {
    Info { kind: r.kind.into(), name: name.to_string(), parent: r.parent.clone(), labels: r.labels.clone(), created_at: r.created, updated_at: r.updated }
}

fn bind(source: &Path, writable: bool) -> Mount {
    Mount { r#type: "bind".into(), source: source.display().to_string(), target: String::new(), options: vec!["rbind".into(), if writable { "rw" } else { "ro" }.into()] }
}

fn overlay(options: Vec<String>) -> Mount {
    Mount { r#type: "overlay".into(), source: "overlay".into(), target: String::new(), options }
}

impl Inner {
    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// Mounts again what the database says should be mounted.
    fn reattach(&self) {
        let Ok(all) = self.meta.all() else { return };
        for (name, r) in all {
            if let Content::NaiadImage { source, mountpoint } = &r.content {
                match self.mounts.ensure(source, mountpoint) {
                    Ok(()) => tracing::info!("snapshot {name}: {} served", mountpoint.display()),
                    Err(e) => tracing::error!("snapshot {name}: {e}"),
                }
            }
        }
    }

    /// The directories below a snapshot whose parent is `parent`, top first.
    fn lowers(&self, parent: &str) -> Result<Vec<PathBuf>, SnapshotterError> {
        let mut out = Vec::new();
        let mut name = parent.to_string();
        for _ in 0..MAX_CHAIN {
            if name.is_empty() {
                return Ok(out);
            }
            let r = self.meta.require(&name)?;
            match &r.content {
                Content::Local => out.push(self.snapshot_dir(r.id).join("fs")),
                Content::NaiadBlob => {}
                Content::NaiadImage { source, mountpoint } => {
                    // The image's mount holds every layer below it.
                    self.mounts.ensure(source, mountpoint)?;
                    out.push(mountpoint.clone());
                    return Ok(out);
                }
            }
            name = r.parent;
        }
        Err(SnapshotterError::FailedPrecondition(format!("the parent chain of {parent:?} is longer than {MAX_CHAIN}")))
    }

    fn mounts_of(&self, r: &Record) -> Result<Vec<Mount>, SnapshotterError> {
        let dir = self.snapshot_dir(r.id);
        let lowers = self.lowers(&r.parent)?;
        let lowerdir = || format!("lowerdir={}", lowers.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":"));
        Ok(match (r.kind == Kind::View, lowers.len()) {
            (false, 0) => vec![bind(&dir.join("fs"), true)],
            (false, _) => vec![overlay(vec!["index=off".into(), format!("workdir={}", dir.join("work").display()), format!("upperdir={}", dir.join("fs").display()), lowerdir()])],
            (true, 0) => vec![bind(&dir.join("fs"), false)],
            (true, 1) => vec![bind(&lowers[0], false)],
            (true, _) => vec![overlay(vec!["index=off".into(), lowerdir()])],
        })
    }

    /// A layer of a naiad image, prepared for a pull: recorded as the
    /// committed snapshot `target` (the bootstrap mounted first), and
    /// answered "already exists". `None` for an ordinary layer.
    fn prepare_remote(&self, target: &str, parent: &str, labels: &HashMap<String, String>) -> Result<Option<SnapshotterError>, SnapshotterError> {
        if self.meta.get(target)?.is_some() {
            return Ok(Some(SnapshotterError::AlreadyExists(target.to_string())));
        }
        let Some(layer) = LayerLabels::from_labels(labels) else { return Ok(None) };
        let content = match self.roles.role(&layer)? {
            LayerRole::Ordinary => return Ok(None),
            LayerRole::NaiadBlob => Content::NaiadBlob,
            LayerRole::NaiadBootstrap { source } => {
                let mountpoint = mountpoint_for(&self.root, &source);
                self.mounts.ensure(&source, &mountpoint)?;
                Content::NaiadImage { source, mountpoint }
            }
        };
        let mut labels = labels.clone();
        labels.insert(LABEL_REMOTE.into(), "true".into());
        let now = SystemTime::now();
        match self.meta.create(target, |id| Record { id, kind: Kind::Committed, parent: parent.to_string(), labels, created: now, updated: now, content }) {
            Ok(r) => tracing::info!("layer {} of {}: snapshot {target} ({:?})", layer.layer_digest, layer.image_ref, r.content),
            Err(SnapshotterError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(Some(SnapshotterError::AlreadyExists(target.to_string())))
    }

    fn create(&self, key: &str, parent: &str, labels: HashMap<String, String>, kind: Kind) -> Result<Vec<Mount>, SnapshotterError> {
        if kind == Kind::Active {
            if let Some(target) = labels.get(LABEL_TARGET) {
                if let Some(exists) = self.prepare_remote(target, parent, &labels)? {
                    return Err(exists);
                }
            }
        }
        let now = SystemTime::now();
        let record = self.meta.create(key, |id| Record { id, kind, parent: parent.to_string(), labels, created: now, updated: now, content: Content::Local })?;
        let dir = self.snapshot_dir(record.id);
        let made = std::fs::create_dir_all(dir.join("fs")).and_then(|()| std::fs::create_dir_all(dir.join("work"))).at(&dir);
        match made.and_then(|()| self.mounts_of(&record)) {
            Ok(m) => Ok(m),
            Err(e) => {
                let _ = self.meta.remove(key);
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn remove(&self, key: &str) -> Result<(), SnapshotterError> {
        let r = self.meta.remove(key)?;
        let dir = self.snapshot_dir(r.id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).at(&dir)?;
        }
        if let Content::NaiadImage { mountpoint, .. } = &r.content {
            let shared = self.meta.all()?.iter().any(|(_, o)| matches!(&o.content, Content::NaiadImage { mountpoint: m, .. } if m == mountpoint));
            if !shared {
                self.mounts.release(mountpoint)?;
            }
        }
        tracing::debug!("removed snapshot {key}");
        Ok(())
    }

    fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, SnapshotterError> {
        let mut r = self.meta.require(&info.name)?;
        let paths = fieldpaths.unwrap_or_default();
        if paths.is_empty() {
            r.labels = info.labels.clone();
        }
        for path in paths {
            if path == "labels" {
                r.labels = info.labels.clone();
            } else if let Some(label) = path.strip_prefix("labels.") {
                match info.labels.get(label) {
                    Some(v) => r.labels.insert(label.to_string(), v.clone()),
                    None => r.labels.remove(label),
                };
            } else {
                return Err(SnapshotterError::InvalidArgument(format!("cannot update field {path:?} of snapshot {:?} (only labels)", info.name)));
            }
        }
        r.updated = SystemTime::now();
        self.meta.put(&info.name, &r)?;
        Ok(self::info(&info.name, &r))
    }

    fn usage(&self, key: &str) -> Result<Usage, SnapshotterError> {
        let r = self.meta.require(key)?;
        let mut usage = Usage::default();
        if r.content == Content::Local {
            let mut stack = vec![self.snapshot_dir(r.id).join("fs")];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                for entry in entries.flatten() {
                    let Ok(md) = entry.metadata() else { continue };
                    usage.inodes += 1;
                    usage.size += (std::os::unix::fs::MetadataExt::blocks(&md) * 512) as i64;
                    if md.is_dir() {
                        stack.push(entry.path());
                    }
                }
            }
        }
        Ok(usage)
    }

    /// Removes directories and mounts no snapshot owns (containerd's
    /// Cleanup, after garbage collection).
    fn cleanup(&self) -> Result<(), SnapshotterError> {
        let all = self.meta.all()?;
        let ids: std::collections::HashSet<String> = all.iter().map(|(_, r)| r.id.to_string()).collect();
        let mountpoints: std::collections::HashSet<PathBuf> =
            all.iter().filter_map(|(_, r)| if let Content::NaiadImage { mountpoint, .. } = &r.content { Some(mountpoint.clone()) } else { None }).collect();
        let snapshots = self.root.join("snapshots");
        for entry in std::fs::read_dir(&snapshots).at(&snapshots)?.flatten() {
            if !ids.contains(&entry.file_name().to_string_lossy().to_string()) {
                tracing::info!("cleanup: removing {}", entry.path().display());
                std::fs::remove_dir_all(entry.path()).at(entry.path())?;
            }
        }
        let mounts = self.root.join("mounts");
        for entry in std::fs::read_dir(&mounts).at(&mounts)?.flatten() {
            if !mountpoints.contains(&entry.path()) {
                tracing::info!("cleanup: releasing {}", entry.path().display());
                self.mounts.release(&entry.path())?;
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Snapshotter for NaiadSnapshotter {
    type Error = SnapshotterError;

    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        self.run(move |i| i.meta.require(&key).map(|r| info(&key, &r))).await
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Self::Error> {
        self.run(move |i| i.update(info, fieldpaths)).await
    }

    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        self.run(move |i| i.usage(&key)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        self.run(move |i| {
            let r = i.meta.require(&key)?;
            if r.kind == Kind::Committed {
                return Err(SnapshotterError::FailedPrecondition(format!("snapshot {key:?} is committed: it has no mounts of its own")));
            }
            i.mounts_of(&r)
        })
        .await
    }

    async fn prepare(&self, key: String, parent: String, labels: HashMap<String, String>) -> Result<Vec<Mount>, Self::Error> {
        self.run(move |i| i.create(&key, &parent, labels, Kind::Active)).await
    }

    async fn view(&self, key: String, parent: String, labels: HashMap<String, String>) -> Result<Vec<Mount>, Self::Error> {
        self.run(move |i| i.create(&key, &parent, labels, Kind::View)).await
    }

    async fn commit(&self, name: String, key: String, labels: HashMap<String, String>) -> Result<(), Self::Error> {
        self.run(move |i| {
            let r = i.meta.commit(&name, &key, labels)?;
            let _ = std::fs::remove_dir_all(i.snapshot_dir(r.id).join("work"));
            Ok(())
        })
        .await
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        self.run(move |i| i.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), Self::Error> {
        self.run(|i| i.cleanup()).await
    }

    type InfoStream = BoxStream<'static, Result<Info, Self::Error>>;

    async fn list(&self, _snapshotter: String, _filters: Vec<String>) -> Result<Self::InfoStream, Self::Error> {
        // containerd filters the list itself (by its own metadata).
        let all = self.run(|i| i.meta.all()).await?;
        let infos: Vec<Result<Info, SnapshotterError>> = all.iter().map(|(n, r)| Ok(info(n, r))).collect();
        Ok(Box::pin(futures::stream::iter(infos)))
    }
}
