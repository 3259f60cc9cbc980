//! `naiad pull --containerd SOCKET [--namespace NS] REF`: a lazy pull into
//! containerd for users without CRI (see `naiad_containerd::pull`). After
//! it, `ctr run --snapshotter naiad REF ID CMD` runs the image.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use naiad_containerd::pull::{pull as pull_into, PullRequest};
use naiad_registry::DockerReference;

#[derive(Args)]
pub struct PullArgs {
    /// The naiad image: [docker://]HOST/REPO[:TAG][@DIGEST]
    pub image: String,
    /// containerd's socket.
    #[arg(long, value_name = "SOCKET")]
    pub containerd: PathBuf,
    /// containerd namespace.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The naiad snapshotter's name in containerd's proxy_plugins.
    #[arg(long, default_value = "naiad")]
    pub snapshotter: String,
    #[command(flatten)]
    pub registry: crate::cmd::registry_flags::RegistryFlags,
}

pub fn run(a: PullArgs) -> Result<i32> {
    let shown = a.image.strip_prefix("docker://").unwrap_or(&a.image);
    let reference = DockerReference::parse(shown).with_context(|| format!("image {}", a.image))?;
    let request = PullRequest { socket: a.containerd.clone(), namespace: a.namespace.clone(), reference, registry: a.registry.options()?, snapshotter: a.snapshotter.clone() };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let pulled = runtime.block_on(pull_into(request))?;
    outln!("{} {} ({} layers, snapshot {})", pulled.name, pulled.manifest_digest, pulled.layers, pulled.chain_id);
    Ok(0)
}
