//! `naiad inspect SRC [--json] [--path P]`.

use anyhow::{Context, Result};
use clap::Args;
use naiad_reader::NaiadImage;
use naiad_registry::ImageRef;

use crate::cmd::registry_flags::RegistryFlags;

#[derive(Args)]
pub struct InspectArgs {
    /// The naiad image: oci:DIR[:TAG] or docker://[HOST/]NAME[:TAG|@DIGEST]
    pub source: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// List the chunks of this file instead.
    #[arg(long)]
    pub path: Option<String>,
    #[command(flatten)]
    pub registry: RegistryFlags,
}

pub fn run(a: InspectArgs) -> Result<i32> {
    let reference = ImageRef::parse(&a.source)?;
    let image = NaiadImage::open_with(&reference, &a.registry.options()?).with_context(|| format!("opening {reference}"))?;
    if let Some(path) = &a.path {
        let chunks = naiad_converter::inspect::file_chunks(&image.bootstrap, path)?;
        if a.json {
            outln!("{}", serde_json::to_string_pretty(&chunks)?);
        } else {
            outln!("{:>12} {:>8} {:>9} {:>8} {:>5} {:>12} {:>8} {:>5}  digest", "offset", "size", "chunk_off", "chunk", "blob", "blob_off", "stored", "zstd");
            for c in chunks {
                outln!(
                    "{:>12} {:>8} {:>9} {:>8} {:>5} {:>12} {:>8} {:>5}  {}",
                    c.file_offset,
                    c.size,
                    c.chunk_offset,
                    c.chunk_size,
                    c.blob_index,
                    c.blob_offset,
                    c.stored_size,
                    c.compressed,
                    c.digest
                );
            }
        }
        return Ok(0);
    }
    let s = naiad_converter::inspect::inspect(&image)?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    outln!("image:        {}", s.reference);
    outln!("files:        {} ({} hardlinks), {} directories, {} symlinks, {} special", s.files, s.hardlinks, s.directories, s.symlinks, s.special_files);
    outln!("total size:   {:.1} MiB in regular files", mib(s.total_file_bytes));
    outln!("chunks:       {} references, {} unique ({:.1} MiB), chunking {}", s.chunks, s.unique_chunks, mib(s.unique_chunk_bytes), s.chunking);
    outln!("stored:       {:.1} MiB, compression ratio {:.2}", mib(s.stored_chunk_bytes), s.compression_ratio);
    outln!("bootstrap:    {} bytes ({} compressed), {:.1} bytes per inode", s.bootstrap_bytes, s.bootstrap_layer_bytes, s.bootstrap_bytes as f64 / s.inodes.max(1) as f64);
    outln!("prefetch:     {} chunks", s.prefetch_chunks);
    for (i, b) in s.blobs.iter().enumerate() {
        outln!("blob {i}:       {} {:.1} MiB", b.digest, mib(b.size));
    }
    Ok(0)
}
