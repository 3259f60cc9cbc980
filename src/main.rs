//! The `naiad` command line: parses arguments and calls the crates. Each
//! subcommand lives in its own file under `cmd/`.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "naiad", version, about = "Lazy-loading container images: convert, inspect, check, unpack, mount and run")]
struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an OCI image into a naiad image (bootstrap + chunk blobs).
    Convert(cmd::convert::ConvertArgs),
    /// Convert, record what the image's command reads at startup, and convert again with that startup set first.
    Optimize(cmd::optimize::OptimizeArgs),
    /// Summarize a naiad image: files, chunks, blobs, compression.
    Inspect(cmd::inspect::InspectArgs),
    /// Validate a naiad image's bootstrap and verify every chunk of every blob.
    Check(cmd::check::CheckArgs),
    /// Write a naiad image's merged root filesystem to a directory or a tar file.
    Unpack(cmd::unpack::UnpackArgs),
    /// Mount a naiad image read-only with FUSE, fetching chunks on demand.
    Mount(cmd::mount::MountArgs),
    /// Unmount a naiad mount; its daemon exits.
    Umount(cmd::mount::UmountArgs),
    /// Print a mount's counters.
    Stats(cmd::mount::StatsArgs),
    /// Run a command in a naiad image mounted lazily, under a writable overlay.
    Run(cmd::run::RunArgs),
    /// Pull a naiad image into containerd lazily (no CRI needed); then `ctr run --snapshotter naiad`.
    Pull(cmd::pull::PullArgs),
    /// containerd's remote snapshotter: serve naiad images (and ordinary ones) as container rootfs.
    Snapshotter(cmd::snapshotter::SnapshotterArgs),
    /// Manage the daemon of a mount (live upgrade).
    #[command(subcommand)]
    Daemon(cmd::mount::DaemonCommand),
}

fn main() {
    let cli = Cli::parse();
    let configured = match &cli.command {
        Command::Snapshotter(a) => cmd::snapshotter::log_level(a),
        _ => None,
    };
    init_logging(cli.verbose, configured);
    let result = match cli.command {
        Command::Convert(a) => cmd::convert::run(a),
        Command::Optimize(a) => cmd::optimize::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Unpack(a) => cmd::unpack::run(a),
        Command::Mount(a) => cmd::mount::mount(a),
        Command::Umount(a) => cmd::mount::umount(a),
        Command::Stats(a) => cmd::mount::stats(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Pull(a) => cmd::pull::run(a),
        Command::Snapshotter(a) => cmd::snapshotter::run(a),
        Command::Daemon(c) => cmd::mount::daemon_command(c),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("naiad: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Log filter: RUST_LOG, else `-v`s, else what the command's
/// configuration says (the snapshotter's `log_level`), else warnings.
fn init_logging(verbose: u8, configured: Option<String>) {
    let default = match (verbose, configured) {
        (0, Some(level)) => level,
        (0, None) => "warn".into(),
        (1, _) => "debug".into(),
        _ => "trace".into(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
