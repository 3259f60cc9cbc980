//! `naiad check SRC`.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use naiad_reader::{ChunkReader, NaiadImage};
use naiad_registry::ImageRef;

use crate::cmd::registry_flags::RegistryFlags;

#[derive(Args)]
pub struct CheckArgs {
    /// The naiad image: oci:DIR[:TAG] or docker://[HOST/]NAME[:TAG|@DIGEST]
    pub source: String,
    #[command(flatten)]
    pub registry: RegistryFlags,
}

pub fn run(a: CheckArgs) -> Result<i32> {
    let reference = ImageRef::parse(&a.source)?;
    let image = NaiadImage::open_with(&reference, &a.registry.options()?).with_context(|| format!("checking {reference}"))?;
    let report = naiad_converter::check::check(&ChunkReader::new(Arc::new(image), a.registry.merge_limits()))?;
    for p in &report.problems {
        eprintln!("naiad: {reference}: {p}");
    }
    if report.ok() {
        outln!("{reference}: ok ({} chunks, {} blobs verified)", report.chunks_checked, report.blobs_checked);
        Ok(0)
    } else {
        eprintln!("naiad: {reference}: {} problem(s) found", report.problems.len());
        Ok(1)
    }
}
