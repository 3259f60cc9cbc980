//! One module per subcommand. Each exposes its clap `Args` struct and a
//! function returning the process exit code. Standard output is written
//! with [`outln!`]: a reader that went away (`naiad inspect ... | head`)
//! ends the command quietly.

/// `println!` that ends the process quietly (exit 0, as ripgrep does) when
/// stdout is a closed pipe, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cmd::write_stdout(format_args!($($arg)*))
    };
}

pub mod check;
pub mod convert;
pub mod inspect;
pub mod mount;
pub mod optimize;
pub mod pull;
pub mod registry_flags;
pub mod run;
pub mod snapshotter;
pub mod unpack;

/// Parses a byte size from the command line: `4096`, `64K`, `1M`, `2G`
/// (binary units), for clap's `value_parser`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    naiad_fuse::size::parse_size(s).map_err(|e| e.to_string())
}

/// Writes one line to stdout (see [`outln!`]).
pub fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.write_all(b"\n")).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("naiad: error: writing to stdout: {e}");
        std::process::exit(1);
    }
}
