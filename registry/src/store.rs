//! [`BlobStore`]: random access to blob bytes, what naiad's chunk reader
//! (`naiad-reader`) reads through: a local OCI layout ([`LayoutBlobStore`])
//! or a registry read with HTTP range requests
//! ([`crate::RegistryBlobStore`]). A store reads exactly the range it is
//! given, in one request; which ranges are read together is the reader's
//! decision, not the store's. A store that receives a range piece by piece
//! (a registry) shows the reader each longer prefix as it arrives
//! ([`BlobStore::read_range_progressive`]), so the chunks at the front of a
//! large request are usable before its last byte is in. A registry store
//! can also start a read before it is asked for
//! ([`crate::RegistryBlobStore::start_read`]); a read within it is then
//! served from it.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use crate::digest::Digest;
use crate::error::{RegistryError, Result};
use crate::layout::OciLayout;

/// Reads byte ranges of blobs by digest.
pub trait BlobStore: Send + Sync {
    /// Reads exactly `len` bytes of blob `digest` from `offset`.
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// [`BlobStore::read_range`], calling `arrived` with the bytes of the
    /// range received so far (always a prefix of the range, growing; a
    /// retried attempt starts again from a shorter one) as they come in.
    /// The default reads the whole range, then shows it once.
    fn read_range_progressive(&self, digest: &Digest, offset: u64, len: u64, arrived: &mut dyn FnMut(&[u8])) -> Result<Vec<u8>> {
        let data = self.read_range(digest, offset, len)?;
        arrived(&data);
        Ok(data)
    }
    /// A short description for logs and errors (`oci:/path`).
    fn describe(&self) -> String;
    /// Drops the bytes of reads started ahead that no read has taken yet
    /// (the reader will not want them). Stores that start none do nothing.
    fn forget_started_reads(&self) {}
}

/// A [`BlobStore`] over an OCI layout's `blobs/` directory, with open files
/// kept for reuse.
pub struct LayoutBlobStore {
    layout: OciLayout,
    files: Mutex<HashMap<Digest, Arc<OpenBlob>>>,
}

/// An open blob file and its size (blobs are content-addressed, so the
/// size read at open stays true).
struct OpenBlob {
    file: File,
    size: u64,
}

impl LayoutBlobStore {
    pub fn new(layout: OciLayout) -> Self {
        LayoutBlobStore { layout, files: Mutex::new(HashMap::new()) }
    }

    fn file(&self, digest: &Digest) -> Result<Arc<OpenBlob>> {
        if let Ok(files) = self.files.lock() {
            if let Some(f) = files.get(digest) {
                return Ok(f.clone());
            }
        }
        let file = self.layout.open_blob(digest)?;
        let size = file.metadata().map_err(|source| RegistryError::Io { path: self.layout.blob_path(digest), source })?.len();
        let f = Arc::new(OpenBlob { file, size });
        if let Ok(mut files) = self.files.lock() {
            files.insert(digest.clone(), f.clone());
        }
        Ok(f)
    }
}

impl BlobStore for LayoutBlobStore {
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        let blob = self.file(digest)?;
        if offset.checked_add(len).is_none_or(|end| end > blob.size) {
            return Err(RegistryError::RangeOutOfBounds { digest: digest.to_string(), offset, len, size: blob.size });
        }
        let mut buf = vec![0u8; len as usize];
        blob.file.read_exact_at(&mut buf, offset).map_err(|source| RegistryError::Io { path: self.layout.blob_path(digest), source })?;
        Ok(buf)
    }

    fn describe(&self) -> String {
        format!("oci:{}", self.layout.dir().display())
    }
}
