//! Where images live and how their bytes are read and written.
//!
//! - [`reference`]: image references as users type them (`oci:DIR[:TAG]`,
//!   `docker-archive:FILE`).
//! - [`layout`]: an OCI image layout directory: the embedded default store.
//! - [`docker_archive`]: the tarball `docker save` writes.
//! - [`source`]: [`SourceImage`], an image opened for reading: its manifest,
//!   config and layers, every blob verified against its digest.
//! - [`store`]: [`BlobStore`], random access to blob bytes by (digest, offset,
//!   length): what the FUSE daemon fetches chunks through.
//!
//! The OCI distribution (HTTP registry) client plugs in behind the same
//! [`SourceImage`] and [`BlobStore`] interfaces.

pub mod digest;
pub mod docker_archive;
pub mod error;
pub mod layout;
pub mod manifest;
pub mod naiad_image;
pub mod reference;
pub mod source;
pub mod store;

pub use digest::{Digest, DigestReader, DigestWriter};
pub use error::RegistryError;
pub use layout::OciLayout;
pub use naiad_image::{ChunkReadError, NaiadImage};
pub use reference::ImageRef;
pub use source::{open_source, LayerBlob, SourceImage};
pub use store::{BlobStore, LayoutBlobStore};
