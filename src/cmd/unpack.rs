//! `naiad unpack SRC DIR` and `naiad unpack SRC --tar FILE`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use naiad_reader::{ChunkReader, NaiadImage};
use naiad_registry::ImageRef;

use crate::cmd::registry_flags::RegistryFlags;

#[derive(Args)]
pub struct UnpackArgs {
    /// The naiad image: oci:DIR[:TAG] or docker://[HOST/]NAME[:TAG|@DIGEST]
    pub source: String,
    /// Directory to create (must not exist, or be empty).
    pub dir: Option<PathBuf>,
    /// Write a tar file instead of a directory.
    #[arg(long, conflicts_with = "dir")]
    pub tar: Option<PathBuf>,
    /// Leave character and block devices out of the directory.
    #[arg(long, conflicts_with = "tar")]
    pub no_devices: bool,
    /// Clear setuid and setgid bits in the directory.
    #[arg(long, conflicts_with = "tar")]
    pub no_setuid: bool,
    #[command(flatten)]
    pub registry: RegistryFlags,
}

pub fn run(a: UnpackArgs) -> Result<i32> {
    let reference = ImageRef::parse(&a.source)?;
    let image = NaiadImage::open_with(&reference, &a.registry.options()?).with_context(|| format!("opening {reference}"))?;
    let image = ChunkReader::new(Arc::new(image), a.registry.merge_limits());
    match (&a.dir, &a.tar) {
        (Some(dir), None) => naiad_converter::unpack::unpack_to_dir(&image, dir, naiad_converter::unpack::UnpackOptions { no_devices: a.no_devices, no_setuid: a.no_setuid })
            .with_context(|| format!("unpacking {reference} into {}", dir.display()))?,
        (None, Some(tar)) => naiad_converter::unpack::unpack_to_tar(&image, tar).with_context(|| format!("unpacking {reference} to {}", tar.display()))?,
        _ => bail!("give a directory or --tar FILE"),
    }
    Ok(0)
}
