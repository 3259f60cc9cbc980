//! One module per subcommand. Each exposes its clap `Args` struct and a
//! function returning the process exit code.

pub mod check;
pub mod convert;
pub mod inspect;
pub mod mount;
pub mod registry_flags;
pub mod run;
pub mod unpack;
