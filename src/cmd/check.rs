//! `naiad check SRC`.

use anyhow::{Context, Result};
use clap::Args;
use naiad_registry::{ImageRef, NaiadImage};

#[derive(Args)]
pub struct CheckArgs {
    /// The naiad image: oci:DIR[:TAG]
    pub source: String,
}

pub fn run(a: CheckArgs) -> Result<i32> {
    let reference = ImageRef::parse(&a.source)?;
    let image = NaiadImage::open(&reference).with_context(|| format!("checking {reference}"))?;
    let report = naiad_converter::check::check(&image)?;
    for p in &report.problems {
        eprintln!("naiad: {reference}: {p}");
    }
    if report.ok() {
        println!("{reference}: ok ({} chunks, {} blobs verified)", report.chunks_checked, report.blobs_checked);
        Ok(0)
    } else {
        eprintln!("naiad: {reference}: {} problem(s) found", report.problems.len());
        Ok(1)
    }
}
