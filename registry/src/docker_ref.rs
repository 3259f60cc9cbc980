//! [`DockerReference`]: an image in a registry, written the way docker
//! writes it (`host:port/name:tag`, `name@sha256:...`, `ubuntu`), and
//! normalized the way docker normalizes it: no registry means Docker Hub
//! (`docker.io`, served at `registry-1.docker.io`), and a one-component
//! Docker Hub name lives under `library/`.

use std::net::IpAddr;

use crate::digest::Digest;
use crate::error::{RegistryError, Result};

/// The registry name docker uses for Docker Hub.
pub const DOCKER_HUB: &str = "docker.io";
/// The host Docker Hub's registry API is served from.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";

/// A normalized registry image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DockerReference {
    /// `host[:port]`, lower-case; `docker.io` for Docker Hub.
    pub registry: String,
    /// The repository path (`library/debian`, `team/app`).
    pub repository: String,
    /// The tag, if one was written.
    pub tag: Option<String>,
    /// The manifest digest, if one was written (`@sha256:...`).
    pub digest: Option<Digest>,
}

impl DockerReference {
    /// Parses a reference as docker accepts it (without the `docker://`
    /// transport): `[host[:port]/]path[:tag][@sha256:hex]`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason: &str| RegistryError::BadReference { reference: format!("docker://{s}"), reason: reason.to_string() };
        if s.is_empty() {
            return Err(bad("missing image name after docker://"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(Digest::parse(d).map_err(|_| bad("a digest is sha256: followed by 64 lower-case hex digits"))?)),
            None => (s, None),
        };
        // A tag follows the last ':' that comes after the last '/'.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            let valid = !t.is_empty()
                && t.len() <= 128
                && t.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !valid {
                return Err(bad("a tag is 1-128 characters of [A-Za-z0-9_.-], not starting with '.' or '-'"));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => (first.to_ascii_lowercase(), rest.to_string()),
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" || registry == DOCKER_HUB_ENDPOINT { DOCKER_HUB.to_string() } else { registry };
        validate_host(&registry).map_err(|r| bad(&r))?;
        let repository = if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path };
        validate_repository(&repository).map_err(|r| bad(&r))?;
        Ok(DockerReference { registry, repository, tag: tag.map(str::to_string), digest })
    }

    /// What to ask the registry's manifest endpoint for: the digest if
    /// one was given, else the tag, else `latest`.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The tag to push to: the written tag or `latest`.
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }

    /// The host (and port) the registry API is served from.
    pub fn endpoint_host(&self) -> &str {
        endpoint_host(&self.registry)
    }

    /// The same repository with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Self {
        DockerReference { tag: Some(tag.to_string()), digest: None, ..self.clone() }
    }
}

impl std::fmt::Display for DockerReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The host a registry name is served from (`docker.io` is
/// `registry-1.docker.io`; every other name is its own host).
pub fn endpoint_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_ENDPOINT
    } else {
        registry
    }
}

/// The host part of `host[:port]` (brackets of an IPv6 literal removed).
pub fn host_without_port(host_port: &str) -> &str {
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host_port.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => h,
        _ => host_port,
    }
}

/// True for `localhost`, 127.0.0.0/8 and ::1, which docker reaches over
/// plain HTTP without being told.
pub fn is_loopback_host(host_port: &str) -> bool {
    let host = host_without_port(host_port);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn validate_host(host: &str) -> std::result::Result<(), String> {
    if host.is_empty() {
        return Err("empty registry host".into());
    }
    let (name, port) = if host.starts_with('[') {
        match host.split_once(']') {
            Some((h, rest)) => (h.trim_start_matches('['), rest.strip_prefix(':')),
            None => return Err("unterminated IPv6 address".into()),
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        }
    };
    if let Some(p) = port {
        if p.parse::<u16>().is_err() {
            return Err(format!("bad port {p:?} in registry host {host:?}"));
        }
    }
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c));
    if !ok {
        return Err(format!("bad registry host {host:?}"));
    }
    Ok(())
}

/// Repository path components: lower-case alphanumerics separated by
/// `.`, `_`, `__` or runs of `-`.
fn validate_repository(repo: &str) -> std::result::Result<(), String> {
    if repo.is_empty() || repo.len() > 255 {
        return Err("a repository name is 1-255 characters".into());
    }
    for component in repo.split('/') {
        let bytes = component.as_bytes();
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let ok = !bytes.is_empty()
            && alnum(bytes[0])
            && alnum(bytes[bytes.len() - 1])
            && bytes.iter().all(|&c| alnum(c) || c == b'.' || c == b'_' || c == b'-')
            && !component.contains("..")
            && !component.contains("___")
            && !component.contains(".-")
            && !component.contains("-.");
        if !ok {
            return Err(format!("bad repository path component {component:?} (lower-case letters, digits and . _ - separators)"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> DockerReference {
        DockerReference::parse(s).unwrap()
    }

    #[test]
    fn docker_hub_defaults() {
        let d = r("debian");
        assert_eq!((d.registry.as_str(), d.repository.as_str(), d.tag.as_deref()), ("docker.io", "library/debian", None));
        assert_eq!(d.manifest_reference(), "latest");
        assert_eq!(d.endpoint_host(), "registry-1.docker.io");
        assert_eq!(r("user/app:1").repository, "user/app");
        assert_eq!(r("docker.io/debian:12").repository, "library/debian");
        assert_eq!(r("index.docker.io/library/debian").registry, "docker.io");
    }

    #[test]
    fn hosts_ports_tags_digests() {
        let d = r("127.0.0.1:5000/img:1");
        assert_eq!((d.registry.as_str(), d.repository.as_str(), d.tag.as_deref()), ("127.0.0.1:5000", "img", Some("1")));
        assert_eq!(d.to_string(), "127.0.0.1:5000/img:1");
        let h = "a".repeat(64);
        let d = r(&format!("localhost/a/b@sha256:{h}"));
        assert_eq!(d.registry, "localhost");
        assert_eq!(d.repository, "a/b");
        assert_eq!(d.manifest_reference(), format!("sha256:{h}"));
        let d = r(&format!("quay.io/x/y:v2@sha256:{h}"));
        assert_eq!(d.tag.as_deref(), Some("v2"));
        assert!(d.digest.is_some());
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("127.1.2.3"));
        assert!(is_loopback_host("localhost:80"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("quay.io"));
        assert!(!is_loopback_host("10.0.0.1:5000"));
    }

    #[test]
    fn rejects_bad_references() {
        for s in ["", "UPPER/x", "host:5000/img:", "img:bad tag", "img@sha256:xyz", "host:99999/img", "a//b", "img:-x"] {
            assert!(DockerReference::parse(s).is_err(), "{s:?} should be rejected");
        }
    }
}
