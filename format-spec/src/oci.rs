//! Names used when a naiad image is packaged as an OCI image: media types of
//! its layers and the annotations that tie them together. SPEC.md, section
//! "OCI packaging", describes how they are used.

/// Media type of a chunk blob: concatenated chunks, see [`crate::chunk`].
pub const MEDIA_TYPE_BLOB: &str = "application/vnd.oci.image.layer.naiad.blob.v1";
/// Media type of the bootstrap layer: the bootstrap file, zstd-compressed.
pub const MEDIA_TYPE_BOOTSTRAP: &str = "application/vnd.oci.image.layer.naiad.bootstrap.v1+zstd";
/// Annotation on the manifest marking a naiad image; value is the format version.
pub const ANNOTATION_FORMAT: &str = "org.naiad.format";
/// Annotation on a layer saying what it is: "bootstrap" or "blob".
pub const ANNOTATION_LAYER_KIND: &str = "org.naiad.layer";
/// Annotation on a blob layer: its index in the bootstrap's blob table.
pub const ANNOTATION_BLOB_INDEX: &str = "org.naiad.blob.index";
/// Annotation on the prefetch blob's layer: how many bytes at its start
/// hold the startup set, in the prefetch table's order (decimal).
pub const ANNOTATION_STARTUP_SET: &str = "org.naiad.blob.startup-set";
/// Annotation on the bootstrap layer: sha256 digest of the uncompressed bootstrap.
pub const ANNOTATION_BOOTSTRAP_DIGEST: &str = "org.naiad.bootstrap.uncompressed-digest";
/// Annotation on the manifest: the source image's manifest digest.
pub const ANNOTATION_SOURCE_DIGEST: &str = "org.naiad.source.digest";
/// Value of [`ANNOTATION_FORMAT`] for this version.
pub const FORMAT_VERSION: &str = "2";
