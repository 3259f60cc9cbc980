//! [`RegistryOptions`]: how naiad talks to registries (credentials, plain
//! HTTP hosts, extra CA certificates, mirrors, timeouts, retries, range
//! merging, upload chunking, platform). The CLI builds one from its flags
//! and the environment; the library's defaults are docker's.

use std::path::PathBuf;
use std::time::Duration;

use crate::credentials::Credentials;
use crate::platform::Platform;

/// Serializable, so that a daemon gets them whole from its supervisor.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct RegistryOptions {
    /// `--creds`: for the registry of the image being read or written
    /// (other registries, and this one without it, use the docker config).
    pub credentials: Option<Credentials>,
    /// `host[:port]`s reached over plain HTTP (loopback always is).
    pub insecure_registries: Vec<String>,
    /// PEM files of extra trusted CA certificates.
    pub ca_files: Vec<PathBuf>,
    /// Base URLs (`https://mirror.example`, `http://127.0.0.1:5001`) tried
    /// in order before the origin for blob reads.
    pub mirrors: Vec<String>,
    pub connect_timeout: Duration,
    /// Longest wait for a response or for more of its body.
    pub read_timeout: Duration,
    /// Slowest transfer tolerated, in bytes per second: a response body of
    /// N bytes must be complete within `read_timeout + N / min_transfer_rate`,
    /// however its bytes trickle in (each read alone may succeed).
    pub min_transfer_rate: u64,
    /// Attempts per request (1 = no retries) on 5xx, 429, connection
    /// failures, timeouts and truncated bodies.
    pub max_attempts: u32,
    /// First backoff delay; doubles per attempt, with jitter.
    pub retry_base_delay: Duration,
    /// Cap on one backoff delay (also on a Retry-After the server asks for).
    pub retry_max_delay: Duration,
    /// Blobs larger than this are uploaded in PATCH chunks of this size;
    /// smaller ones in one PUT.
    pub upload_chunk_size: u64,
    /// How long a mirror that failed is skipped before it is tried again.
    pub mirror_cooldown: Duration,
    /// Which manifest of an index to use; this host's when `None`.
    pub platform: Option<Platform>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            credentials: None,
            insecure_registries: Vec::new(),
            ca_files: Vec::new(),
            mirrors: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            min_transfer_rate: 64 << 10,
            max_attempts: 5,
            retry_base_delay: Duration::from_millis(200),
            retry_max_delay: Duration::from_secs(10),
            upload_chunk_size: 16 << 20,
            mirror_cooldown: Duration::from_secs(30),
            platform: None,
        }
    }
}

impl RegistryOptions {
    /// When a response body of `bytes` bytes, started now, must be complete.
    pub fn body_deadline(&self, bytes: u64) -> std::time::Instant {
        let transfer = Duration::from_secs_f64(bytes as f64 / self.min_transfer_rate.max(1) as f64);
        let now = std::time::Instant::now();
        now.checked_add(self.read_timeout.saturating_add(transfer)).unwrap_or(now + Duration::from_secs(86400))
    }

    /// The platform to select from indexes.
    pub fn platform(&self) -> Platform {
        self.platform.clone().unwrap_or_else(Platform::host)
    }
}

impl std::fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("credentials", &self.credentials.as_ref().map(|_| "<redacted>"))
            .field("insecure_registries", &self.insecure_registries)
            .field("ca_files", &self.ca_files)
            .field("mirrors", &self.mirrors)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("min_transfer_rate", &self.min_transfer_rate)
            .field("max_attempts", &self.max_attempts)
            .field("retry_base_delay", &self.retry_base_delay)
            .field("retry_max_delay", &self.retry_max_delay)
            .field("upload_chunk_size", &self.upload_chunk_size)
            .field("mirror_cooldown", &self.mirror_cooldown)
            .field("platform", &self.platform)
            .finish()
    }
}
