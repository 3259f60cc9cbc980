//! `naiad check SRC`.

use anyhow::{Context, Result};
use clap::Args;
use naiad_registry::{ImageRef, NaiadImage};

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
    let report = naiad_converter::check::check(&image)?;
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
