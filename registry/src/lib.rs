//! Where images live and how their bytes are read and written.
//!
//! - [`reference`]: image references as users type them (`oci:DIR[:TAG]`,
//!   `docker-archive:FILE`, `docker://[HOST/]NAME[:TAG][@DIGEST]`);
//!   [`docker_ref`] parses and normalizes the registry kind.
//! - [`layout`]: an OCI image layout directory: the embedded default store.
//! - [`docker_archive`]: the tarball `docker save` writes.
//! - [`source`]: [`SourceImage`], an image opened for reading: its manifest,
//!   config and layers, every blob verified against its digest.
//! - [`store`]: [`BlobStore`], random access to blob bytes by (digest, offset,
//!   length), exactly the ranges asked for: what naiad's chunk reader
//!   (`naiad-reader`) fetches chunks through.
//! - [`verified_file`]: markers vouching for files derived from a blob.
//!
//! The registry (OCI distribution) client:
//! - [`registry_options`]: [`RegistryOptions`], how registries are reached.
//! - [`registry_client`]: [`RegistryClient`], one registry's HTTP API with
//!   authentication ([`authenticator`], [`auth_challenge`],
//!   [`token_cache`], [`credentials`]), redirects and retries ([`retry`]),
//!   and mirrors.
//! - [`remote_image`]: manifest (through indexes, by [`platform`]) and config.
//! - [`blob_stream`]: a whole blob streamed, resumed after a broken connection.
//! - [`remote_store`]: [`RegistryBlobStore`], lazy reads with HTTP ranges,
//!   and [`started_reads`], reads started before they are asked for.
//! - [`blob_upload`], [`image_push`]: pushing an OCI layout's image.

pub mod auth_challenge;
pub mod authenticator;
pub mod blob_stream;
pub mod blob_upload;
pub mod credentials;
pub mod digest;
pub mod docker_archive;
pub mod docker_ref;
pub mod error;
pub mod image_push;
pub mod layout;
pub mod manifest;
pub mod platform;
pub mod reference;
pub mod registry_client;
pub mod registry_options;
pub mod remote_image;
pub mod remote_store;
pub mod retry;
pub mod source;
pub mod started_reads;
pub mod store;
pub mod token_cache;
pub mod verified_file;

pub use blob_upload::BlobPushOutcome;
pub use credentials::{CredentialStore, Credentials};
pub use digest::{Digest, DigestReader, DigestWriter};
pub use docker_ref::DockerReference;
pub use error::RegistryError;
pub use image_push::{push_image, PushSummary};
pub use layout::OciLayout;
pub use platform::Platform;
pub use reference::ImageRef;
pub use registry_client::{RegistryClient, RegistryStats};
pub use registry_options::RegistryOptions;
pub use remote_store::RegistryBlobStore;
pub use source::{open_source, open_source_reading, open_source_with, LayerBlob, LayerReads, SourceImage};
pub use started_reads::{BlobRange, StartedReads};
pub use store::{BlobStore, LayoutBlobStore};
pub use token_cache::TokenCache;
