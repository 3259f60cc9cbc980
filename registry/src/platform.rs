//! [`Platform`]: which manifest of an image index or manifest list to use
//! (`linux/amd64`, `linux/arm64/v8`); this host's by default.

use serde_json::Value;

use crate::error::{RegistryError, Result};
use crate::manifest::{host_architecture, Descriptor};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// linux and this host's architecture.
    pub fn host() -> Self {
        Platform { os: "linux".into(), architecture: host_architecture().into(), variant: None }
    }

    /// Parses `OS/ARCH[/VARIANT]`.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = (2..=3).contains(&parts.len()) && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if !ok {
            return Err(RegistryError::Config(format!("platform {s:?}: expected OS/ARCH[/VARIANT], e.g. linux/arm64/v8")));
        }
        Ok(Platform { os: parts[0].into(), architecture: parts[1].into(), variant: parts.get(2).map(|v| v.to_string()) })
    }

    /// The entry of an index for this platform: an exact variant match
    /// first, then any variant; or the only entry of a one-entry index.
    pub fn select<'a>(&self, manifests: &'a [Descriptor]) -> Option<&'a Descriptor> {
        let field = |d: &Descriptor, k: &str| d.platform.as_ref().and_then(|p| p.get(k)).and_then(Value::as_str).map(str::to_string);
        let matches = |d: &Descriptor| field(d, "architecture").as_deref() == Some(self.architecture.as_str()) && field(d, "os").is_none_or(|os| os == self.os);
        let exact = manifests.iter().find(|d| matches(d) && (self.variant.is_none() || field(d, "variant") == self.variant));
        exact.or_else(|| manifests.iter().find(|d| matches(d))).or_else(|| if manifests.len() == 1 { manifests.first() } else { None })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(arch: &str, variant: Option<&str>) -> Descriptor {
        let mut desc = Descriptor::new("m", &format!("sha256:{arch}"), 1);
        desc.platform = Some(match variant {
            Some(v) => json!({"os": "linux", "architecture": arch, "variant": v}),
            None => json!({"os": "linux", "architecture": arch}),
        });
        desc
    }

    #[test]
    fn selects() {
        let list = vec![d("amd64", None), d("arm", Some("v6")), d("arm", Some("v7")), d("arm64", Some("v8"))];
        assert_eq!(Platform::parse("linux/arm/v7").unwrap().select(&list).unwrap().digest, "sha256:arm");
        assert_eq!(Platform::parse("linux/arm/v7").unwrap().select(&list).unwrap().platform.as_ref().unwrap()["variant"], "v7");
        assert_eq!(Platform::parse("linux/arm64").unwrap().select(&list).unwrap().digest, "sha256:arm64");
        assert!(Platform::parse("linux/s390x").unwrap().select(&list).is_none());
        assert!(Platform::parse("linux").is_err());
    }
}
