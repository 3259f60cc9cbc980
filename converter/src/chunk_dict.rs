//! Chunk dictionaries (`naiad convert --chunk-dict IMAGE`): the chunks of
//! earlier naiad images, which a conversion references where it would
//! otherwise store the same bytes again (SPEC 5.6).
//!
//! A chunk whose digest a dictionary holds gets a chunk record pointing
//! into the dictionary's blob; the blob joins the new image's blob table
//! and its manifest, so a registry keeps it alive for the new image even
//! when the dictionary's tag is deleted. A dictionary blob the new image
//! would use only a little of ([`MIN_BLOB_USE`]) is not referenced: the
//! chunks it would have served are copied, as stored, into a blob of the
//! new image's own, so a cold start does not fetch from many blobs that
//! are mostly dead weight to it.

use std::collections::HashMap;

use naiad_format::{BlobRecord, ChunkDigest, ChunkRecord};
use naiad_reader::{ChunkReader, MergeLimits, NaiadImage};
use naiad_registry::{Digest, ImageRef, OciLayout, RegistryOptions};

use crate::error::{ConvertError, Result};

/// Share of a dictionary blob's bytes the new image must use for the blob
/// to be referenced; below it, the chunks are copied instead.
pub const MIN_BLOB_USE: f64 = 0.25;

/// Chunk records of the sink name a dictionary blob by
/// `DICT_BLOB_BASE + dictionary blob id` until the blob table is final.
pub const DICT_BLOB_BASE: u32 = 1 << 31;

/// One blob of a dictionary image.
pub struct DictBlob {
    /// Which dictionary image holds it.
    image: usize,
    pub record: BlobRecord,
    pub digest: Digest,
}

/// A chunk a dictionary holds: its record, with `blob_index` the
/// dictionary blob id (an index into [`ChunkDict::blobs`]).
#[derive(Debug, Clone, Copy)]
pub struct DictChunk {
    pub record: ChunkRecord,
}

/// Where the new image's destination is, for the rule on which
/// dictionaries it may reference.
pub enum Destination<'a> {
    Layout,
    Registry(&'a naiad_registry::DockerReference),
}

pub struct ChunkDict {
    /// The dictionary images, each with its chunk reader.
    readers: Vec<ChunkReader>,
    /// Dictionary blob id of each image's blob 0.
    first_blob: Vec<u32>,
    pub blobs: Vec<DictBlob>,
    chunks: HashMap<ChunkDigest, DictChunk>,
}

impl ChunkDict {
    /// Opens the dictionary images. Each must be a naiad image; one on a
    /// registry can serve a registry destination only on the same host (a
    /// manifest can only reference blobs its registry holds).
    pub fn open(references: &[ImageRef], destination: Destination, options: &RegistryOptions) -> Result<Self> {
        let mut dict = ChunkDict { readers: Vec::new(), first_blob: Vec::new(), blobs: Vec::new(), chunks: HashMap::new() };
        for reference in references {
            let bad = |reason: String| ConvertError::Invalid(format!("chunk dictionary {reference}: {reason}"));
            if let (ImageRef::Docker(d), Destination::Registry(dst)) = (reference, &destination) {
                if d.registry != dst.registry {
                    return Err(bad(format!(
                        "it is on {}, the destination on {}: an image can only reference blobs of its own registry; copy the dictionary there first",
                        d.registry, dst.registry
                    )));
                }
            }
            if matches!(reference, ImageRef::DockerArchive { .. }) {
                return Err(bad("a chunk dictionary is a naiad image in an OCI layout or a registry".into()));
            }
            let image = NaiadImage::open_with(reference, options).map_err(|e| bad(e.to_string()))?;
            let n = dict.readers.len();
            let first_blob = dict.blobs.len() as u32;
            for (i, digest) in image.blob_digests.iter().enumerate() {
                let record = image.bootstrap.blob(i as u32).map_err(|e| bad(e.to_string()))?;
                dict.blobs.push(DictBlob { image: n, record, digest: digest.clone() });
            }
            for c in 0..image.bootstrap.chunk_count() {
                let mut record = image.bootstrap.chunk(c).map_err(|e| bad(e.to_string()))?;
                record.blob_index += first_blob;
                dict.chunks.entry(record.digest).or_insert(DictChunk { record });
            }
            dict.first_blob.push(first_blob);
            dict.readers.push(ChunkReader::new(std::sync::Arc::new(image), MergeLimits::default()));
        }
        Ok(dict)
    }

    /// The dictionary images, in the order given.
    pub fn references(&self) -> Vec<&ImageRef> {
        self.readers.iter().map(|r| &r.image().reference).collect()
    }

    /// The dictionary's chunk with this digest, if any.
    pub fn get(&self, digest: &ChunkDigest) -> Option<DictChunk> {
        self.chunks.get(digest).copied()
    }

    /// The stored bytes of dictionary chunks, read through each dictionary
    /// image's chunk reader (merged into few requests) and verified.
    pub fn read_stored(&self, chunks: &[ChunkRecord]) -> Result<Vec<Vec<u8>>> {
        let mut by_image: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, c) in chunks.iter().enumerate() {
            let blob = self.blobs.get(c.blob_index as usize).ok_or_else(|| ConvertError::Invalid(format!("chunk dictionary: no blob {}", c.blob_index)))?;
            by_image.entry(blob.image).or_default().push(i);
        }
        let mut out = vec![Vec::new(); chunks.len()];
        for (n, positions) in by_image {
            let reader = &self.readers[n];
            // The image's own blob numbering.
            let local: Vec<ChunkRecord> = positions.iter().map(|&i| ChunkRecord { blob_index: chunks[i].blob_index - self.first_blob[n], ..chunks[i] }).collect();
            for (&i, r) in positions.iter().zip(reader.read_chunks(&local)) {
                out[i] = r.map_err(|e| ConvertError::Invalid(format!("chunk dictionary {}: {e}", reader.image().reference)))?.stored;
            }
        }
        Ok(out)
    }

    /// Puts dictionary blob `id` into `layout` (unless it is there), copied
    /// from the dictionary and checked against its digest on the way: a
    /// missing or corrupt dictionary blob is an error here, before the new
    /// image is tagged. Returns whether it was copied.
    pub fn copy_blob(&self, id: usize, layout: &OciLayout) -> Result<bool> {
        let blob = &self.blobs[id];
        if layout.has_blob(&blob.digest) {
            return Ok(false);
        }
        let image = self.readers[blob.image].image();
        let bad = |reason: String| ConvertError::Invalid(format!("chunk dictionary {}: blob {}: {reason}", image.reference, blob.digest));
        let mut writer = layout.blob_writer()?;
        let mut offset = 0;
        while offset < blob.record.size {
            let len = (blob.record.size - offset).min(8 << 20);
            let data = image.store.read_range(&blob.digest, offset, len).map_err(|e| bad(e.to_string()))?;
            std::io::Write::write_all(&mut writer, &data).map_err(|source| ConvertError::Io { path: layout.dir().to_path_buf(), source })?;
            offset += len;
        }
        let (digest, size) = writer.commit()?;
        if digest != blob.digest || size != blob.record.size {
            let _ = std::fs::remove_file(layout.blob_path(&digest));
            return Err(bad(format!("its bytes hash to {digest} ({size} bytes): the dictionary is corrupt")));
        }
        Ok(true)
    }

    /// Checks that dictionary blob `id` is in the dictionary's registry
    /// repository, with the size its bootstrap says (a push to the same
    /// registry finds it there or mounts it from there).
    pub fn check_remote_blob(&self, id: usize) -> Result<()> {
        let blob = &self.blobs[id];
        let image = self.readers[blob.image].image();
        let (Some(client), ImageRef::Docker(d)) = (image.registry_client(), &image.reference) else { return Ok(()) };
        match client.head_blob(&d.repository, &blob.digest)? {
            Some(size) if size == blob.record.size => Ok(()),
            Some(size) => {
                Err(ConvertError::Invalid(format!("chunk dictionary {}: blob {} is {size} bytes, its bootstrap says {}", image.reference, blob.digest, blob.record.size)))
            }
            None => Err(ConvertError::Invalid(format!("chunk dictionary {}: blob {} is missing from its registry", image.reference, blob.digest))),
        }
    }

    /// The registry repository dictionary blob `id` can be mounted from.
    pub fn repository_of(&self, id: usize) -> Option<&str> {
        match &self.readers[self.blobs[id].image].image().reference {
            ImageRef::Docker(d) => Some(d.repository.as_str()),
            _ => None,
        }
    }
}
