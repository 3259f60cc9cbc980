//! One module per subcommand. Each exposes its clap `Args` struct and a
//! function returning the process exit code.

pub mod check;
pub mod convert;
pub mod inspect;
pub mod mount;
pub mod optimize;
pub mod registry_flags;
pub mod run;
pub mod unpack;

/// Parses a byte size from the command line: `4096`, `64K`, `1M`, `2G`
/// (binary units), for clap's `value_parser`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    naiad_fuse::size::parse_size(s).map_err(|e| e.to_string())
}
