//! Registry flags shared by every subcommand that takes an image
//! (`--creds`, `--insecure-registry`, `--ca-file`, `--mirror`, timeouts,
//! retries, range merging, platform), each also settable from a
//! `NAIAD_*` environment variable, turned into
//! [`naiad_registry::RegistryOptions`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use naiad_reader::MergeLimits;
use naiad_registry::{Credentials, Platform, RegistryOptions};

#[derive(Args, Clone)]
pub struct RegistryFlags {
    /// Credentials for the image's registry, USER:PASSWORD [default: from
    /// REGISTRY_AUTH_FILE, $DOCKER_CONFIG/config.json or ~/.docker/config.json].
    #[arg(long, value_name = "USER:PASSWORD", env = "NAIAD_REGISTRY_CREDS", hide_env_values = true)]
    pub creds: Option<String>,
    /// Reach this registry (HOST[:PORT]) over plain HTTP (loopback always is). Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]", env = "NAIAD_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    /// Also trust the CA certificates in this PEM file. Repeatable (or FILE:FILE).
    #[arg(long = "ca-file", value_name = "FILE", env = "NAIAD_REGISTRY_CA_FILE", value_delimiter = ':')]
    pub ca_files: Vec<PathBuf>,
    /// Registry mirror (base URL) tried before the origin for blob reads. Repeatable.
    #[arg(long = "mirror", value_name = "URL", env = "NAIAD_REGISTRY_MIRRORS", value_delimiter = ',')]
    pub mirrors: Vec<String>,
    /// Seconds to wait for a registry connection.
    #[arg(long, value_name = "SECS", default_value = "10", env = "NAIAD_REGISTRY_CONNECT_TIMEOUT", value_parser = parse_secs)]
    pub connect_timeout: Duration,
    /// Seconds to wait for a registry response or for more of its body.
    #[arg(long, value_name = "SECS", default_value = "30", env = "NAIAD_REGISTRY_READ_TIMEOUT", value_parser = parse_secs)]
    pub read_timeout: Duration,
    /// Slowest registry transfer tolerated, bytes per second (e.g. 64K): a
    /// body of N bytes must arrive within the read timeout plus N / RATE.
    #[arg(long, value_name = "RATE", default_value = "64K", env = "NAIAD_REGISTRY_MIN_RATE", value_parser = crate::cmd::parse_size)]
    pub min_transfer_rate: u64,
    /// Retries of a failed registry request (5xx, 429, resets, timeouts, truncated bodies).
    #[arg(long, value_name = "N", default_value_t = 4, env = "NAIAD_REGISTRY_RETRIES")]
    pub retries: u32,
    /// Seconds before the first retry; doubles per retry, with jitter.
    #[arg(long, value_name = "SECS", default_value = "0.2", env = "NAIAD_REGISTRY_RETRY_DELAY", value_parser = parse_secs)]
    pub retry_delay: Duration,
    /// Ranges of a blob closer than this are fetched in one request (e.g. 64K).
    #[arg(long, value_name = "SIZE", default_value = "64K", env = "NAIAD_RANGE_MERGE_GAP", value_parser = crate::cmd::parse_size)]
    pub range_merge_gap: u64,
    /// Largest range request for chunks (e.g. 8M): the limit of every merged read.
    #[arg(long, value_name = "SIZE", default_value = "8M", env = "NAIAD_MAX_REQUEST", value_parser = crate::cmd::parse_size)]
    pub max_request: u64,
    /// Blobs larger than this are pushed in PATCH chunks of this size (e.g. 16M).
    #[arg(long, value_name = "SIZE", default_value = "16M", env = "NAIAD_UPLOAD_CHUNK_SIZE", value_parser = crate::cmd::parse_size)]
    pub upload_chunk_size: u64,
    /// Platform to pick from a multi-platform image, OS/ARCH[/VARIANT] [default: this host's].
    #[arg(long, value_name = "OS/ARCH", env = "NAIAD_PLATFORM")]
    pub platform: Option<String>,
}

impl std::fmt::Debug for RegistryFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryFlags")
            .field("creds", &self.creds.as_ref().map(|_| "<redacted>"))
            .field("insecure_registries", &self.insecure_registries)
            .field("ca_files", &self.ca_files)
            .field("mirrors", &self.mirrors)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("min_transfer_rate", &self.min_transfer_rate)
            .field("retries", &self.retries)
            .field("retry_delay", &self.retry_delay)
            .field("range_merge_gap", &self.range_merge_gap)
            .field("max_request", &self.max_request)
            .field("upload_chunk_size", &self.upload_chunk_size)
            .field("platform", &self.platform)
            .finish()
    }
}

fn parse_secs(s: &str) -> std::result::Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

impl RegistryFlags {
    /// How chunk reads are merged into requests (`--range-merge-gap`,
    /// `--max-request`): the one limit of the daemon, `check` and `unpack`.
    pub fn merge_limits(&self) -> MergeLimits {
        MergeLimits { gap: self.range_merge_gap, max_request: self.max_request.max(1) }
    }

    /// The options these flags describe.
    pub fn options(&self) -> Result<RegistryOptions> {
        let credentials = match &self.creds {
            // The error never repeats the value.
            Some(c) => Some(Credentials::parse(c).context("--creds")?),
            None => None,
        };
        let platform = match &self.platform {
            Some(p) => Some(Platform::parse(p).context("--platform")?),
            None => None,
        };
        Ok(RegistryOptions {
            credentials,
            insecure_registries: self.insecure_registries.iter().filter(|h| !h.is_empty()).cloned().collect(),
            ca_files: self.ca_files.clone(),
            mirrors: self.mirrors.iter().filter(|m| !m.is_empty()).cloned().collect(),
            connect_timeout: self.connect_timeout,
            read_timeout: self.read_timeout,
            min_transfer_rate: self.min_transfer_rate.max(1),
            max_attempts: self.retries.saturating_add(1),
            retry_base_delay: self.retry_delay,
            upload_chunk_size: self.upload_chunk_size.max(1),
            platform,
            ..RegistryOptions::default()
        })
    }
}
