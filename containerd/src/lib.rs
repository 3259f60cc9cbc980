//! naiad under containerd.
//!
//! - [`snapshotter`]: [`NaiadSnapshotter`], containerd's snapshots API
//!   (a proxy plugin): naiad images as lazy mounts, ordinary layers as
//!   directories, containers as overlays; [`server`] serves it on a unix
//!   socket.
//! - [`layer_role`]: telling a naiad layer from an ordinary one by the
//!   labels containerd's CRI plugin sets.
//! - [`image_mounts`]: the one naiad mount per image behind its snapshots.
//! - [`metadata`]: the snapshots' state in an embedded database (redb).
//! - [`pull`]: `naiad pull --containerd`, a lazy pull into containerd
//!   without CRI.
//! - [`config`]: the snapshotter's TOML file.
//! - [`error`]: [`SnapshotterError`] and the gRPC status of each.

pub mod config;
pub mod error;
pub mod image_mounts;
pub mod layer_role;
pub mod metadata;
pub mod pull;
pub mod server;
pub mod snapshotter;

pub use config::SnapshotterConfig;
pub use error::SnapshotterError;
pub use snapshotter::NaiadSnapshotter;
