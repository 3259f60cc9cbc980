//! naiad-runtime: running a command in a mounted naiad image, as
//! `naiad run` does, through a real OCI runtime (crun or runc).
//!
//! - [`image_command`]: the command an image runs ([`CommandOverrides`]:
//!   Entrypoint and Cmd with `docker run`'s overrides) and its `PATH`.
//! - [`user`]: the image's user database, read inside the image
//!   ([`resolve_user`], [`read_in_root`]), and environments ([`merge_env`]).
//! - [`bundle`]: the OCI `config.json`: the isolation a container gets.
//! - [`seccomp`]: the default seccomp profile.
//! - [`oci_runtime`]: [`run`], the overlay and the runtime process, exit
//!   codes, stop signals and cleanup.
//! - [`signals`]: [`StopSignals`], stop signals caught for a whole run.

pub mod bundle;
pub mod error;
pub mod image_command;
pub mod oci_runtime;
pub mod seccomp;
pub mod signals;
pub mod user;

pub use bundle::ProcessSpec;
pub use error::RuntimeError;
pub use image_command::{image_env, image_path, CommandOverrides, DEFAULT_PATH};
pub use oci_runtime::{find_runtime, run, RunSpec};
pub use signals::{stop_signal, StopSignals};
pub use user::{merge_env, read_in_root, resolve_user, ResolvedUser};
