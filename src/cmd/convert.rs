//! `naiad convert SRC DST`.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use naiad_converter::{ChunkDictSource, Chunking, ConvertOptions, Progress};
use naiad_registry::ImageRef;

use crate::cmd::parse_size;
use crate::cmd::registry_flags::RegistryFlags;

#[derive(Clone, Copy, ValueEnum)]
pub enum ChunkMode {
    /// Fixed-size chunks of --chunk-size bytes.
    Fixed,
    /// Content-defined chunks (FastCDC) between --cdc-min and --cdc-max, about --cdc-avg.
    Cdc,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Source image: oci:DIR[:TAG], docker-archive:FILE or docker://[HOST/]NAME[:TAG|@DIGEST]
    pub source: String,
    /// Destination: oci:DIR[:TAG] (created if missing; other images in it are kept) or docker://[HOST/]NAME[:TAG]
    pub destination: String,
    /// What the workload reads at startup: a trace from `naiad mount
    /// --record-trace`, or paths and globs, one per line. Those chunks are
    /// stored together and fetched first at mount.
    #[arg(long, value_name = "FILE")]
    pub prefetch_list: Option<std::path::PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub flags: ConvertFlags,
}

/// How to convert: shared by `naiad convert` and `naiad optimize`.
#[derive(Args)]
pub struct ConvertFlags {
    /// How files are cut into chunks.
    #[arg(long, value_enum, default_value = "cdc")]
    pub chunking: ChunkMode,
    /// Chunk size for --chunking fixed (a power of two; K/M suffixes allowed).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub chunk_size: u64,
    #[arg(long, default_value = "16K", value_parser = parse_size)]
    pub cdc_min: u64,
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub cdc_avg: u64,
    #[arg(long, default_value = "256K", value_parser = parse_size)]
    pub cdc_max: u64,
    /// Regular files smaller than this are packed together into shared
    /// chunks (chunk groups), so a tree of small files compresses like a
    /// tar and costs one chunk record per group; 0 gives every file chunks
    /// of its own.
    #[arg(long, default_value = "32K", value_parser = parse_size)]
    pub small_files: u64,
    /// Average uncompressed size of a chunk group of small files (where a
    /// group ends depends on the files' contents; none exceeds twice this).
    #[arg(long, default_value = "128K", value_parser = parse_size)]
    pub group_size: u64,
    /// zstd level for chunk groups (1-22).
    #[arg(long, default_value_t = 6)]
    pub group_zstd_level: i32,
    /// zstd level for chunks of large files (1-22); lower converts faster,
    /// for larger blobs (3: about 7x faster, 10 % larger).
    #[arg(long, default_value_t = naiad_converter::DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
    /// zstd level for the startup set (the prefetch blob, fetched on every
    /// cold start; only with --prefetch-list or optimize).
    #[arg(long, default_value_t = 19)]
    pub prefetch_zstd_level: i32,
    /// A naiad image (oci:DIR[:TAG] or docker://...) whose chunks are
    /// referenced instead of stored again: its blobs become layers of the
    /// new image too. `auto`: the naiad image at the destination's tag (in
    /// a layout without one, its newest naiad image). Repeatable.
    #[arg(long, value_name = "IMAGE")]
    pub chunk_dict: Vec<String>,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub registry: RegistryFlags,
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn layer_started(&self, index: usize, count: usize, digest: &str, size: u64) {
        self.0.set_length(size);
        self.0.set_position(0);
        let short = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.0.set_message(format!("layer {}/{} {}", index + 1, count, &short[..short.len().min(12)]));
    }
    fn advanced(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finished(&self) {
        self.0.finish_and_clear();
    }
}

fn to_u32(v: u64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| anyhow::anyhow!("{what} {v} is too large"))
}

impl ConvertFlags {
    /// The converter options these flags describe (no prefetch list).
    pub fn options(&self) -> Result<ConvertOptions> {
        let chunking = match self.chunking {
            ChunkMode::Fixed => Chunking::Fixed { size: to_u32(self.chunk_size, "--chunk-size")? },
            ChunkMode::Cdc => {
                Chunking::ContentDefined { min: to_u32(self.cdc_min, "--cdc-min")?, avg: to_u32(self.cdc_avg, "--cdc-avg")?, max: to_u32(self.cdc_max, "--cdc-max")? }
            }
        };
        let mut opts = ConvertOptions {
            chunking,
            zstd_level: self.zstd_level,
            prefetch_zstd_level: self.prefetch_zstd_level,
            small_file_max: to_u32(self.small_files, "--small-files")?,
            group_size: to_u32(self.group_size, "--group-size")?,
            group_zstd_level: self.group_zstd_level,
            chunk_dicts: self
                .chunk_dict
                .iter()
                .map(|d| if d == "auto" { Ok(ChunkDictSource::Auto) } else { ImageRef::parse(d).map(ChunkDictSource::Image).with_context(|| format!("--chunk-dict {d}")) })
                .collect::<Result<_>>()?,
            registry: self.registry.options()?,
            ..Default::default()
        };
        if !self.quiet && std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                    .map(|s| s.progress_chars("=> "))
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            opts.progress = Some(Arc::new(Bar(bar)));
        }
        Ok(opts)
    }
}

pub fn run(a: ConvertArgs) -> Result<i32> {
    let source = ImageRef::parse(&a.source)?;
    let destination = ImageRef::parse(&a.destination)?;
    let mut opts = a.flags.options()?;
    if let Some(path) = &a.prefetch_list {
        opts.prefetch = Some(Arc::new(naiad_converter::PrefetchList::load(path)?));
    }
    convert_and_report(&source, &destination, &opts, a.json)?;
    Ok(0)
}

/// Converts and prints the summary (JSON on stdout, or a line on stderr).
pub fn convert_and_report(source: &ImageRef, destination: &ImageRef, opts: &ConvertOptions, json: bool) -> Result<naiad_converter::ConvertSummary> {
    let summary = naiad_converter::convert(source, destination, opts).with_context(|| format!("converting {source} to {destination}"))?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        eprintln!(
            "converted {} -> {}: {} files, {} dirs, {:.1} MiB in, {:.1} MiB out ({} blobs, bootstrap {:.1} KiB), {} file pieces in {} distinct chunks (dedup {:.2}x) in {:.2}s",
            summary.source,
            summary.destination,
            summary.tree.files,
            summary.tree.directories,
            summary.bytes_in as f64 / 1048576.0,
            summary.bytes_out as f64 / 1048576.0,
            summary.blobs,
            summary.bootstrap_compressed_bytes as f64 / 1024.0,
            summary.chunks,
            summary.unique_chunks,
            summary.dedup_ratio,
            summary.seconds
        );
        if !summary.chunk_dicts.is_empty() {
            eprintln!(
                "chunk dictionary {}: {} chunks taken from it, {} of its blobs referenced; {:.1} MiB of new blobs",
                summary.chunk_dicts.join(", "),
                summary.dict_chunks,
                summary.dict_blobs,
                summary.new_blob_bytes as f64 / 1048576.0
            );
        }
        if let Some(p) = &summary.push {
            eprintln!(
                "pushed {} ({}): {} blobs uploaded ({:.1} MiB), {} mounted, {} already there",
                p.destination,
                p.manifest_digest,
                p.blobs_uploaded,
                p.bytes_uploaded as f64 / 1048576.0,
                p.blobs_mounted,
                p.blobs_existing
            );
        }
    }
    Ok(summary)
}
