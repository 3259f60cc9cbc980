//! [`SnapshotterConfig`]: the snapshotter's TOML file (`naiad snapshotter
//! --config FILE`), and the daemon configuration each image mount gets
//! from it ([`SnapshotterConfig::daemon_config`]).
//!
//! ```toml
//! address = "/run/naiad/snapshotter.sock"   # the gRPC socket containerd dials
//! root = "/var/lib/naiad-snapshotter"       # snapshots, metadata, mounts
//! log_level = "info"
//!
//! [registry]
//! insecure_registries = ["127.0.0.1:5000"]  # plain HTTP, as --insecure-registry
//! mirrors = ["http://127.0.0.1:5001"]
//! ca_files = ["/etc/ssl/registry-ca.pem"]
//! connect_timeout_secs = 10
//! read_timeout_secs = 30
//! retries = 4
//!
//! [cache]
//! dir = "/var/cache/naiad"
//! size = "2G"
//! memory = "256M"
//!
//! [prefetch]
//! enabled = true
//! threads = 2
//! rate = "0"           # bytes per second, 0: unlimited
//! fetch_all = false
//! ```
//!
//! Unknown keys are errors, so a typo does not silently do nothing.
//! Credentials are not in this file: they come from docker's config.json
//! and credential helpers, as for every other naiad command.

use std::path::{Path, PathBuf};
use std::time::Duration;

use naiad_fuse::daemon::{CacheConfig, MountConfig, ServeConfig};
use naiad_fuse::{DaemonConfig, PrefetchConfig, RuntimePaths};
use naiad_registry::RegistryOptions;
use serde::Deserialize;

use crate::error::SnapshotterError;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotterConfig {
    /// The unix socket the snapshots service listens on.
    #[serde(default = "default_address")]
    pub address: PathBuf,
    /// State directory: `metadata.redb`, `snapshots/`, `mounts/`, `run/`.
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// tracing filter (`info`, `debug`, `naiad_containerd=debug`).
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default)]
    pub registry: RegistrySection,
    #[serde(default)]
    pub cache: CacheSection,
    #[serde(default)]
    pub prefetch: PrefetchSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    pub insecure_registries: Vec<String>,
    pub mirrors: Vec<String>,
    pub ca_files: Vec<PathBuf>,
    pub connect_timeout_secs: f64,
    pub read_timeout_secs: f64,
    pub retries: u32,
}

impl Default for RegistrySection {
    fn default() -> Self {
        let d = RegistryOptions::default();
        RegistrySection {
            insecure_registries: Vec::new(),
            mirrors: Vec::new(),
            ca_files: Vec::new(),
            connect_timeout_secs: d.connect_timeout.as_secs_f64(),
            read_timeout_secs: d.read_timeout.as_secs_f64(),
            retries: d.max_attempts.saturating_sub(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// The chunk cache, shared by every image mount.
    pub dir: PathBuf,
    /// Its size cap, e.g. "2G".
    pub size: String,
    /// Memory for decompressed chunks per mount, e.g. "256M".
    pub memory: String,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection { dir: PathBuf::from("/var/cache/naiad"), size: "2G".into(), memory: "256M".into() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchSection {
    pub enabled: bool,
    pub threads: usize,
    /// Bytes per second, e.g. "20M"; "0": unlimited.
    pub rate: String,
    pub fetch_all: bool,
}

impl Default for PrefetchSection {
    fn default() -> Self {
        let d = PrefetchConfig::default();
        PrefetchSection { enabled: d.enabled, threads: d.threads, rate: "0".into(), fetch_all: d.fetch_all }
    }
}

fn default_address() -> PathBuf {
    PathBuf::from("/run/naiad/snapshotter.sock")
}
fn default_root() -> PathBuf {
    PathBuf::from("/var/lib/naiad-snapshotter")
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        SnapshotterConfig {
            address: default_address(),
            root: default_root(),
            log_level: default_log_level(),
            registry: RegistrySection::default(),
            cache: CacheSection::default(),
            prefetch: PrefetchSection::default(),
        }
    }
}

/// A positive, finite number of seconds.
fn seconds(what: &str, v: f64) -> Result<Duration, String> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("{what} must be a positive number of seconds, not {v}"))
    }
}

impl SnapshotterConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, SnapshotterError> {
        let text = std::fs::read_to_string(path).map_err(|source| SnapshotterError::Io { path: path.to_path_buf(), source })?;
        Self::parse(&text).map_err(|reason| SnapshotterError::Config { path: path.to_path_buf(), reason })
    }

    /// Parses and checks a configuration's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: SnapshotterConfig = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        for (what, p) in [("address", &config.address), ("root", &config.root), ("cache.dir", &config.cache.dir)] {
            if !p.is_absolute() {
                return Err(format!("{what} must be an absolute path, not {:?}", p.display().to_string()));
            }
        }
        // Every derived value is checked now, not at the first pull.
        config.registry_options()?;
        config.cache_config()?;
        config.prefetch_config()?;
        Ok(config)
    }

    /// How registries are reached (credentials from docker's config.json).
    pub fn registry_options(&self) -> Result<RegistryOptions, String> {
        let r = &self.registry;
        Ok(RegistryOptions {
            insecure_registries: r.insecure_registries.clone(),
            mirrors: r.mirrors.clone(),
            ca_files: r.ca_files.clone(),
            connect_timeout: seconds("registry.connect_timeout_secs", r.connect_timeout_secs)?,
            read_timeout: seconds("registry.read_timeout_secs", r.read_timeout_secs)?,
            max_attempts: r.retries.saturating_add(1),
            ..RegistryOptions::default()
        })
    }

    fn cache_config(&self) -> Result<CacheConfig, String> {
        let size = |what: &str, s: &str| naiad_fuse::size::parse_size(s).map_err(|e| format!("{what}: {e}"));
        let disk_bytes = size("cache.size", &self.cache.size)?;
        Ok(CacheConfig { memory_bytes: size("cache.memory", &self.cache.memory)?, disk_dir: (disk_bytes > 0).then(|| self.cache.dir.clone()), disk_bytes })
    }

    fn prefetch_config(&self) -> Result<PrefetchConfig, String> {
        let p = &self.prefetch;
        if !(1..=32).contains(&p.threads) {
            return Err(format!("prefetch.threads must be 1 to 32, not {}", p.threads));
        }
        let rate = naiad_fuse::size::parse_size(&p.rate).map_err(|e| format!("prefetch.rate: {e}"))?;
        Ok(PrefetchConfig { enabled: p.enabled, threads: p.threads, rate: (rate > 0).then_some(rate), fetch_all: p.fetch_all })
    }

    /// Where image mounts keep their sockets, pid files and logs.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// The configuration of the daemon that serves the naiad image
    /// `source` (`docker://HOST/REPO@DIGEST`) on `mountpoint`.
    pub fn daemon_config(&self, source: &str, mountpoint: &Path) -> Result<DaemonConfig, String> {
        let runtime = RuntimePaths::new(&self.run_dir(), mountpoint);
        Ok(DaemonConfig {
            source: source.to_string(),
            registry: self.registry_options()?,
            serve: ServeConfig {
                mountpoint: mountpoint.to_path_buf(),
                source: source.to_string(),
                // A container rootfs: setuid binaries work (the overlay on
                // top decides for the container); device nodes come from
                // the runtime, not the image. A container usually runs the
                // image's entrypoint: it is loaded at mount (lazy images).
                mount: MountConfig { allow_other: true, suid: true, dev: false, program: naiad_fuse::ProgramLoad::Command(Default::default()), ..MountConfig::default() },
                cache: self.cache_config()?,
                runtime: runtime.clone(),
                prefetch: self.prefetch_config()?,
                merge: naiad_fuse::MergeLimits::default(),
                record_trace: None,
                api_socket: None,
            },
            log_file: runtime.log_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_a_full_file_parse() {
        let c = SnapshotterConfig::parse("").expect("empty file");
        assert_eq!(c.address, PathBuf::from("/run/naiad/snapshotter.sock"));
        let c = SnapshotterConfig::parse(
            "address = \"/tmp/s.sock\"\nroot = \"/tmp/r\"\n[registry]\ninsecure_registries = [\"127.0.0.1:5000\"]\nretries = 1\n[cache]\nsize = \"1G\"\n[prefetch]\nthreads = 3\nrate = \"10M\"\n",
        )
        .expect("full file");
        let r = c.registry_options().unwrap();
        assert_eq!(r.insecure_registries, vec!["127.0.0.1:5000".to_string()]);
        assert_eq!(r.max_attempts, 2);
        let d = c.daemon_config("docker://h/r@sha256:00", Path::new("/tmp/r/mounts/x")).unwrap();
        assert_eq!(d.serve.cache.disk_bytes, 1 << 30);
        assert_eq!(d.serve.prefetch.rate, Some(10 << 20));
        assert!(d.serve.runtime.socket.starts_with("/tmp/r/run"));
    }

    #[test]
    fn bad_files_name_the_problem() {
        for (text, needle) in [
            ("adress = \"/x\"", "unknown field `adress`"),
            ("root = \"relative\"", "root must be an absolute path"),
            ("[cache]\nsize = \"lots\"", "cache.size"),
            ("[registry]\nread_timeout_secs = -1", "registry.read_timeout_secs"),
            ("[prefetch]\nthreads = 0", "prefetch.threads"),
            ("address = ", "line 1"),
        ] {
            let err = SnapshotterConfig::parse(text).expect_err(text);
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
