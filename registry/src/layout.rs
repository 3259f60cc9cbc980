//! An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`):
//! naiad's embedded default image store. Blobs are written to temporary
//! names and renamed into place once their digest is known, and index.json
//! is replaced atomically, so an interrupted write leaves the layout as it was.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, DigestWriter};
use crate::error::{IoContext, RegistryError, Result};
use crate::manifest::{Descriptor, Index, ANNOTATION_REF_NAME};

/// Largest JSON document (manifest, index, config) naiad reads into memory.
pub const MAX_JSON_SIZE: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Opens an existing layout.
    pub fn open(dir: &Path) -> Result<Self> {
        let marker = dir.join("oci-layout");
        let text = fs::read_to_string(&marker).map_err(|e| RegistryError::NotALayout { path: dir.to_path_buf(), reason: format!("cannot read {}: {e}", marker.display()) })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| RegistryError::NotALayout { path: dir.to_path_buf(), reason: format!("oci-layout: {e}") })?;
        if v.get("imageLayoutVersion").and_then(|v| v.as_str()).is_none() {
            return Err(RegistryError::NotALayout { path: dir.to_path_buf(), reason: "oci-layout has no imageLayoutVersion".into() });
        }
        Ok(OciLayout { dir: dir.to_path_buf() })
    }

    /// Opens the layout at `dir`, creating an empty one if there is none.
    pub fn open_or_create(dir: &Path) -> Result<Self> {
        if dir.join("oci-layout").exists() {
            return Self::open(dir);
        }
        fs::create_dir_all(dir.join("blobs/sha256")).at(dir)?;
        write_atomic(&dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        if !dir.join("index.json").exists() {
            let index = serde_json::to_vec_pretty(&Index::empty()).map_err(|source| RegistryError::Json { what: "index.json".into(), source })?;
            write_atomic(&dir.join("index.json"), &index)?;
        }
        Ok(OciLayout { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn index(&self) -> Result<Index> {
        let path = self.dir.join("index.json");
        let data = read_limited(&path, MAX_JSON_SIZE)?;
        serde_json::from_slice(&data).map_err(|source| RegistryError::Json { what: path.display().to_string(), source })
    }

    /// The index entry tagged `tag`.
    pub fn resolve(&self, tag: &str) -> Result<Descriptor> {
        let index = self.index()?;
        let found = index.manifests.iter().find(|d| d.annotation(ANNOTATION_REF_NAME) == Some(tag));
        match found {
            Some(d) => Ok(d.clone()),
            None => {
                let tags: Vec<&str> = index.manifests.iter().filter_map(|d| d.annotation(ANNOTATION_REF_NAME)).collect();
                Err(RegistryError::TagNotFound {
                    reference: format!("oci:{}", self.dir.display()),
                    tag: tag.to_string(),
                    available: if tags.is_empty() { "none".into() } else { tags.join(", ") },
                })
            }
        }
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob for reading (not verified: see [`crate::DigestReader`]).
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RegistryError::BlobNotFound { digest: digest.to_string(), store: format!("oci:{}", self.dir.display()) },
            _ => RegistryError::Io { path, source: e },
        })
    }

    /// Reads a whole blob of at most `max` bytes and verifies its digest.
    pub fn read_blob(&self, digest: &Digest, max: u64) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let mut data = Vec::new();
        self.open_blob(digest)?.take(max + 1).read_to_end(&mut data).at(&path)?;
        if data.len() as u64 > max {
            return Err(RegistryError::BadImage { reference: format!("oci:{}", self.dir.display()), reason: format!("blob {digest} is larger than {max} bytes") });
        }
        let actual = Digest::of(&data);
        if &actual != digest {
            return Err(RegistryError::DigestMismatch { digest: digest.to_string(), actual: actual.to_string() });
        }
        Ok(data)
    }

    /// Starts writing a new blob under a temporary name.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let dir = self.dir.join("blobs/sha256");
        fs::create_dir_all(&dir).at(&dir)?;
        let tmp = tempfile::Builder::new().prefix(".naiad-").suffix(".tmp").tempfile_in(&dir).at(&dir)?;
        let file = tmp.reopen().at(tmp.path())?;
        Ok(BlobWriter { writer: DigestWriter::new(BufWriter::with_capacity(1 << 20, file)), tmp, layout: self.clone() })
    }

    /// Writes `data` as a blob and returns its digest.
    pub fn write_blob(&self, data: &[u8]) -> Result<Digest> {
        let mut w = self.blob_writer()?;
        w.write_all(data).at(self.dir.join("blobs/sha256"))?;
        Ok(w.commit()?.0)
    }

    /// Points `tag` at `manifest` in index.json, replacing an older entry with
    /// the same tag and leaving every other entry as it was.
    pub fn set_tag(&self, tag: &str, manifest: Descriptor) -> Result<()> {
        let mut index = self.index()?;
        index.manifests.retain(|d| d.annotation(ANNOTATION_REF_NAME) != Some(tag));
        index.manifests.push(manifest.with_annotation(ANNOTATION_REF_NAME, tag));
        let data = serde_json::to_vec_pretty(&index).map_err(|source| RegistryError::Json { what: "index.json".into(), source })?;
        write_atomic(&self.dir.join("index.json"), &data)
    }
}

/// A blob being written; it appears under its digest only on [`BlobWriter::commit`].
pub struct BlobWriter {
    writer: DigestWriter<BufWriter<File>>,
    tmp: tempfile::NamedTempFile,
    layout: OciLayout,
}

impl BlobWriter {
    pub fn bytes_written(&self) -> u64 {
        self.writer.bytes()
    }

    /// Flushes, syncs and renames the blob to its digest. Returns (digest, size).
    pub fn commit(self) -> Result<(Digest, u64)> {
        let (digest, size, mut buf) = self.writer.finish();
        let path = self.tmp.path().to_path_buf();
        buf.flush().at(&path)?;
        let file = buf.into_inner().map_err(|e| RegistryError::Io { path: path.clone(), source: e.into_error() })?;
        file.sync_all().at(&path)?;
        let dest = self.layout.blob_path(&digest);
        self.tmp.persist(&dest).map_err(|e| RegistryError::Io { path: dest, source: e.error })?;
        Ok((digest, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

/// Replaces `path` with `data` through a temporary file and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".naiad-").suffix(".tmp").tempfile_in(dir).at(dir)?;
    tmp.write_all(data).at(tmp.path())?;
    tmp.as_file().sync_all().at(tmp.path())?;
    tmp.persist(path).map_err(|e| RegistryError::Io { path: path.to_path_buf(), source: e.error })?;
    Ok(())
}

/// Reads at most `max` bytes of `path`; more is an error.
pub fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    File::open(path).at(path)?.take(max + 1).read_to_end(&mut data).at(path)?;
    if data.len() as u64 > max {
        return Err(RegistryError::Io { path: path.to_path_buf(), source: std::io::Error::other(format!("larger than {max} bytes")) });
    }
    Ok(data)
}
