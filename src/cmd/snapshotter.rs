//! `naiad snapshotter --config FILE`: containerd's remote snapshotter, a
//! long-running service on a unix socket (see `naiad_containerd`).
//! containerd loads it as a proxy plugin:
//!
//! ```toml
//! [proxy_plugins.naiad]
//!   type = "snapshot"
//!   address = "/run/naiad/snapshotter.sock"
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use naiad_containerd::{server, NaiadSnapshotter, SnapshotterConfig};

#[derive(Args)]
pub struct SnapshotterArgs {
    /// The snapshotter's TOML configuration (address, root, registry, cache, prefetch).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// The log level the configuration asks for, if it can be read (errors are
/// reported by [`run`]).
pub fn log_level(a: &SnapshotterArgs) -> Option<String> {
    SnapshotterConfig::load(&a.config).ok().map(|c| c.log_level)
}

pub fn run(a: SnapshotterArgs) -> Result<i32> {
    let config = SnapshotterConfig::load(&a.config)?;
    let exe = std::env::current_exe().context("finding the naiad executable")?;
    let address = config.address.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        // The socket first: a second snapshotter on the same address stops
        // here, before it touches the state of the first.
        let listener = server::bind(&address)?;
        let snapshotter = tokio::task::spawn_blocking(move || NaiadSnapshotter::open(config, exe)).await.context("opening the snapshotter's state")??;
        server::serve(snapshotter, listener, &address).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(0)
}
