//! naiad-runtime: running a command in a mounted naiad image, as
//! `naiad run` does, through a real OCI runtime (crun or runc).
//!
//! - [`user`]: the image's user database, read inside the image
//!   ([`resolve_user`], [`read_in_root`]), and environments ([`merge_env`]).
//! - [`bundle`]: the OCI `config.json`: the isolation a container gets.
//! - [`seccomp`]: the default seccomp profile.
//! - [`oci_runtime`]: [`run`], the overlay and the runtime process, exit
//!   codes, stop signals and cleanup.
//! - [`signals`]: [`StopSignals`], stop signals caught for a whole run.

pub mod bundle;
pub mod error;
pub mod oci_runtime;
pub mod seccomp;
pub mod signals;
pub mod user;

pub use bundle::ProcessSpec;
pub use error::RuntimeError;
pub use oci_runtime::{find_runtime, run, RunSpec};
pub use signals::{stop_signal, StopSignals};
pub use user::{merge_env, read_in_root, resolve_user, ResolvedUser, DEFAULT_PATH};
