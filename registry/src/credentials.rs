//! Registry credentials and where they come from: `--creds USER:PASS`, the
//! file `REGISTRY_AUTH_FILE` names, `$DOCKER_CONFIG/config.json` and
//! `~/.docker/config.json` (their `auths` entries, a base64 `auth` or
//! `username`/`password`, and `credHelpers`/`credsStore` helpers).
//!
//! A password never leaves this module except in an `Authorization`
//! header: [`Credentials`]' Debug and every error here leave it out.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

use crate::docker_ref::{host_without_port, DOCKER_HUB, DOCKER_HUB_ENDPOINT};
use crate::error::{RegistryError, Result};

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl Credentials {
    /// Parses `USER:PASS` as given to `--creds`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials { username: u.to_string(), password: p.to_string() }),
            _ => Err(RegistryError::Config("credentials must be USER:PASSWORD with a non-empty user".into())),
        }
    }

    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthEntry(<redacted>)")
    }
}

/// Credentials by registry host, from the explicit option and the config
/// files, looked up when a registry asks for them.
#[derive(Clone, Default)]
pub struct CredentialStore {
    /// `--creds`: used for `explicit_host` only.
    explicit: Option<(String, Credentials)>,
    /// Config files in the order they are consulted.
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialStore").field("explicit_host", &self.explicit.as_ref().map(|(h, _)| h)).field("files", &self.files).finish()
    }
}

impl CredentialStore {
    /// `explicit` (if any) for `host`, then the config files the
    /// environment names.
    pub fn new(host: &str, explicit: Option<Credentials>) -> Self {
        CredentialStore { explicit: explicit.map(|c| (normalize_key(host), c)), files: default_config_files() }
    }

    /// A store reading only these files (tests, tools).
    pub fn with_files(files: Vec<PathBuf>) -> Self {
        CredentialStore { explicit: None, files }
    }

    /// The credentials for registry `host` (`host[:port]`), if any are configured.
    pub fn lookup(&self, host: &str) -> Result<Option<Credentials>> {
        let key = normalize_key(host);
        if let Some((h, c)) = &self.explicit {
            if *h == key {
                return Ok(Some(c.clone()));
            }
        }
        for file in &self.files {
            if let Some(c) = lookup_in_file(file, &key)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

/// `REGISTRY_AUTH_FILE`, `$DOCKER_CONFIG/config.json`, `~/.docker/config.json`,
/// those that exist, in that order.
pub fn default_config_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|v| !v.is_empty()) {
        files.push(PathBuf::from(f));
    }
    match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        Some(d) => files.push(PathBuf::from(d).join("config.json")),
        None => {
            if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                files.push(PathBuf::from(home).join(".docker/config.json"));
            }
        }
    }
    files
}

/// The key a registry is filed under: `host[:port]` without scheme or path,
/// lower-case, with Docker Hub's aliases folded into `docker.io`.
fn normalize_key(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | DOCKER_HUB_ENDPOINT | DOCKER_HUB => DOCKER_HUB.to_string(),
        _ => host,
    }
}

fn lookup_in_file(path: &Path, key: &str) -> Result<Option<Credentials>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RegistryError::Config(format!("{}: {e}", path.display()))),
    };
    // serde's message may quote input; do not pass it on, it could hold a secret.
    let config: ConfigFile =
        serde_json::from_slice(&text).map_err(|e| RegistryError::Config(format!("{}: not a valid auth file (line {}, column {})", path.display(), e.line(), e.column())))?;
    for (name, entry) in &config.auths {
        if normalize_key(name) == key {
            return decode_entry(entry, path, name).map(Some);
        }
    }
    let helper = config.cred_helpers.iter().find(|(h, _)| normalize_key(h) == key).map(|(_, v)| v.clone()).or(config.creds_store.clone());
    match helper {
        Some(helper) if !helper.is_empty() => run_helper(&helper, key),
        _ => Ok(None),
    }
}

fn decode_entry(entry: &AuthEntry, path: &Path, name: &str) -> Result<Credentials> {
    let bad = |what: &str| RegistryError::Config(format!("{}: auths entry {name:?}: {what}", path.display()));
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|_| bad("\"auth\" is not base64"))?;
        let raw = String::from_utf8(raw).map_err(|_| bad("\"auth\" is not UTF-8"))?;
        let (u, p) = raw.split_once(':').ok_or_else(|| bad("\"auth\" is not USER:PASSWORD"))?;
        return Ok(Credentials { username: u.to_string(), password: p.to_string() });
    }
    if let Some(token) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
        // docker's convention: an identity token goes with the user name "<token>".
        return Ok(Credentials { username: "<token>".into(), password: token.to_string() });
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Credentials { username: u.clone(), password: p.clone() }),
        _ => Err(bad("has neither \"auth\" nor \"username\" and \"password\"")),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// Asks `docker-credential-HELPER get` for `key`'s credentials.
fn run_helper(helper: &str, key: &str) -> Result<Option<Credentials>> {
    if !helper.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(RegistryError::Config(format!("credential helper name {helper:?} is not valid")));
    }
    let program = format!("docker-credential-{helper}");
    let server = if key == DOCKER_HUB { "https://index.docker.io/v1/".to_string() } else { key.to_string() };
    let child = Command::new(&program).arg("get").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("credential helper {program} for {}: {e}; continuing without credentials", host_without_port(key));
            return Ok(None);
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| RegistryError::Config(format!("credential helper {program}: {e}")))?;
    if !out.status.success() {
        // "credentials not found" is an ordinary answer.
        return Ok(None);
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout).map_err(|_| RegistryError::Config(format!("credential helper {program}: answer is not valid JSON")))?;
    Ok(Some(Credentials { username: answer.username, password: answer.secret }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_password() {
        let c = Credentials::parse("alice:s3cret:with:colons").unwrap();
        assert_eq!(c.password, "s3cret:with:colons");
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(Credentials::parse("nocolon").is_err());
        assert!(Credentials::parse(":x").is_err());
    }

    #[test]
    fn reads_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:pw1");
        std::fs::write(&f, format!(r#"{{"auths":{{"https://127.0.0.1:5000/v2/":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"hub","password":"pw2"}}}}}}"#))
            .unwrap();
        let store = CredentialStore::with_files(vec![dir.path().join("missing.json"), f]);
        assert_eq!(store.lookup("127.0.0.1:5000").unwrap(), Some(Credentials { username: "bob".into(), password: "pw1".into() }));
        assert_eq!(store.lookup("registry-1.docker.io").unwrap().unwrap().username, "hub");
        assert_eq!(store.lookup("127.0.0.1:5001").unwrap(), None);
    }

    #[test]
    fn malformed_file_error_has_no_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        std::fs::write(&f, r#"{"auths":{"h":{"auth":"topsecret"#).unwrap();
        let e = CredentialStore::with_files(vec![f]).lookup("h").unwrap_err().to_string();
        assert!(!e.contains("topsecret"), "{e}");
    }
}
