//! Image references as users type them on the command line: `oci:`,
//! `docker-archive:` and `docker://` transports.

use std::path::PathBuf;

use crate::docker_ref::DockerReference;
use crate::error::{RegistryError, Result};

/// Where an image is, and which one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `oci:DIR[:TAG]`: an OCI image layout directory; the tag defaults to `latest`.
    Layout { dir: PathBuf, tag: String },
    /// `docker-archive:FILE`: a `docker save` tarball (its first image).
    DockerArchive { file: PathBuf },
    /// `docker://[HOST[:PORT]/]NAME[:TAG][@sha256:HEX]`: an image in a
    /// registry (Docker Hub when no host is written).
    Docker(DockerReference),
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason: &str| RegistryError::BadReference { reference: s.to_string(), reason: reason.to_string() };
        if let Some(rest) = s.strip_prefix("oci:") {
            // The tag is what follows the last ':' unless that ':' is part of
            // the path (a tag never contains '/').
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, t),
                _ => (rest, "latest"),
            };
            if dir.is_empty() {
                return Err(bad("missing directory after oci:"));
            }
            if tag.is_empty() || !tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) || tag.len() > 128 {
                return Err(bad("a tag is 1-128 characters of [A-Za-z0-9._-]"));
            }
            return Ok(ImageRef::Layout { dir: PathBuf::from(dir), tag: tag.to_string() });
        }
        if let Some(file) = s.strip_prefix("docker-archive:") {
            if file.is_empty() {
                return Err(bad("missing file after docker-archive:"));
            }
            return Ok(ImageRef::DockerArchive { file: PathBuf::from(file) });
        }
        if let Some(rest) = s.strip_prefix("docker://") {
            return Ok(ImageRef::Docker(DockerReference::parse(rest)?));
        }
        Err(bad("expected oci:DIR[:TAG], docker-archive:FILE or docker://[HOST/]NAME[:TAG]"))
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Layout { dir, tag } => write!(f, "oci:{}:{}", dir.display(), tag),
            ImageRef::DockerArchive { file } => write!(f, "docker-archive:{}", file.display()),
            ImageRef::Docker(r) => write!(f, "docker://{r}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layout_refs() {
        assert_eq!(ImageRef::parse("oci:/a/b").unwrap(), ImageRef::Layout { dir: "/a/b".into(), tag: "latest".into() });
        assert_eq!(ImageRef::parse("oci:/a/b:v1").unwrap(), ImageRef::Layout { dir: "/a/b".into(), tag: "v1".into() });
        assert_eq!(ImageRef::parse("oci:rel:x").unwrap(), ImageRef::Layout { dir: "rel".into(), tag: "x".into() });
        assert!(ImageRef::parse("oci:").is_err());
        assert!(ImageRef::parse("oci:/a:b c").is_err());
        assert!(ImageRef::parse("/a/b").is_err());
        assert_eq!(ImageRef::parse("docker-archive:/x.tar").unwrap(), ImageRef::DockerArchive { file: "/x.tar".into() });
        let d = ImageRef::parse("docker://127.0.0.1:5000/img:1").unwrap();
        assert_eq!(d.to_string(), "docker://127.0.0.1:5000/img:1");
        assert!(ImageRef::parse("docker://").is_err());
    }
}
