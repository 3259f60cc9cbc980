//! [`Authenticator`]: the `Authorization` header for a request to a
//! registry host. Requests go out anonymously until the host answers 401;
//! its `WWW-Authenticate` challenge is then remembered per host and
//! answered with HTTP Basic or with a bearer token fetched from the token
//! server (credentials, if any, sent to it as Basic), cached per scope
//! set in a [`TokenCache`] and renewed before it expires or when the
//! registry refuses it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::blocking::Client;
use reqwest::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::Url;
use serde::Deserialize;

use crate::auth_challenge::AuthChallenge;
use crate::credentials::{CredentialStore, Credentials};
use crate::error::{RegistryError, Result};
use crate::retry::RetryPolicy;
use crate::token_cache::{scope_key, TokenCache, DEFAULT_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME};

/// What one host asked for, and the tokens it issued.
#[derive(Default)]
struct HostAuth {
    challenge: Option<AuthChallenge>,
    tokens: Arc<TokenCache>,
    /// Credentials looked up for this host (`None` inside: none configured).
    credentials: Option<Option<Credentials>>,
}

/// The header a request went out with, to tell the authenticator what the
/// registry refused.
#[derive(Clone, Default)]
pub struct SentAuth {
    header: Option<String>,
    token: Option<(String, String)>,
}

impl std::fmt::Debug for SentAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.header.is_some() { "SentAuth(<redacted>)" } else { "SentAuth(none)" })
    }
}

impl SentAuth {
    pub fn header(&self) -> Option<&str> {
        self.header.as_deref()
    }
}

/// Largest token answer read; a longer one is refused (tokens are a few KiB).
const MAX_TOKEN_ANSWER: u64 = 1 << 20;

/// The body of a token answer, refused past [`MAX_TOKEN_ANSWER`] bytes.
fn read_token_body(resp: reqwest::blocking::Response) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    let mut body = Vec::new();
    resp.take(MAX_TOKEN_ANSWER + 1).read_to_end(&mut body).map_err(|e| format!("reading the token answer: {e}"))?;
    if body.len() as u64 > MAX_TOKEN_ANSWER {
        return Err(format!("the token answer is larger than {MAX_TOKEN_ANSWER} bytes"));
    }
    Ok(body)
}

/// A token server's answer: the token and how long it may be used (the
/// server's `expires_in`, bounded by [`MAX_TOKEN_LIFETIME`]).
pub fn parse_token_answer(body: &[u8]) -> std::result::Result<(String, Duration), &'static str> {
    let answer: TokenAnswer = serde_json::from_slice(body).map_err(|_| "token server's answer is not JSON")?;
    let token = answer.token.filter(|t| !t.is_empty()).or(answer.access_token.filter(|t| !t.is_empty())).ok_or("token server's answer has no token")?;
    let lifetime = match answer.expires_in {
        Some(s) if s > 0 => Duration::from_secs(s as u64).min(MAX_TOKEN_LIFETIME),
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    Ok((token, lifetime))
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
}

pub struct Authenticator {
    credentials: CredentialStore,
    /// Which token realms may be plain HTTP (see [`RealmPolicy`]).
    realms: RealmPolicy,
    hosts: Mutex<HashMap<String, HostAuth>>,
    /// Tokens fetched from token servers, for statistics and tests.
    pub tokens_fetched: AtomicU64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("credentials", &self.credentials).finish_non_exhaustive()
    }
}

/// Where credentials may be sent to get a token: a registry reached over
/// HTTPS gets its tokens over HTTPS too, unless the realm's host is
/// loopback or listed as insecure. A plain-HTTP realm would see the user's
/// Basic credentials in clear.
#[derive(Debug, Clone, Default)]
pub struct RealmPolicy {
    /// The registry itself is reached over HTTPS.
    pub https_registry: bool,
    /// `host[:port]`s that may be reached over plain HTTP.
    pub insecure_hosts: Vec<String>,
}

impl RealmPolicy {
    /// Why `url` may not be used as a token realm, if it may not.
    fn refuses(&self, url: &Url) -> Option<String> {
        if !self.https_registry || url.scheme() == "https" {
            return None;
        }
        let host = url.host_str().unwrap_or("");
        let host_port = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let listed = self.insecure_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host_port) || h.eq_ignore_ascii_case(host));
        if crate::docker_ref::is_loopback_host(&host_port) || listed {
            return None;
        }
        Some(format!("the registry is HTTPS but its token realm {url} is plain HTTP; credentials are not sent there (list {host_port} with --insecure-registry to allow it)"))
    }
}

impl Authenticator {
    pub fn new(credentials: CredentialStore, realms: RealmPolicy) -> Self {
        Authenticator { credentials, realms, hosts: Mutex::new(HashMap::new()), tokens_fetched: AtomicU64::new(0) }
    }

    fn credentials_for(&self, host: &str) -> Result<Option<Credentials>> {
        if let Ok(hosts) = self.hosts.lock() {
            if let Some(Some(c)) = hosts.get(host).map(|h| h.credentials.clone()) {
                return Ok(c);
            }
        }
        let found = self.credentials.lookup(host)?;
        if let Ok(mut hosts) = self.hosts.lock() {
            hosts.entry(host.to_string()).or_default().credentials = Some(found.clone());
        }
        Ok(found)
    }

    /// True if credentials are configured for `host`.
    pub fn has_credentials(&self, host: &str) -> bool {
        self.credentials_for(host).ok().flatten().is_some()
    }

    /// The `Authorization` header for a request to `host` needing `scopes`,
    /// fetching a token if the host wants one and none is cached.
    pub fn authorize(&self, http: &Client, retry: &RetryPolicy, host: &str, scopes: &[String]) -> Result<SentAuth> {
        let (challenge, tokens) = match self.hosts.lock() {
            Ok(hosts) => match hosts.get(host) {
                Some(h) => (h.challenge.clone(), h.tokens.clone()),
                None => (None, Arc::new(TokenCache::new())),
            },
            Err(_) => (None, Arc::new(TokenCache::new())),
        };
        match challenge {
            None => Ok(SentAuth::default()),
            Some(AuthChallenge::Basic) => Ok(SentAuth { header: self.credentials_for(host)?.map(|c| c.basic_header()), token: None }),
            Some(AuthChallenge::Bearer { realm, service, .. }) => {
                let key = scope_key(scopes);
                let token = match tokens.get(&key) {
                    Some(t) => t,
                    None => {
                        let (t, lifetime) = self.fetch_token(http, retry, host, &realm, service.as_deref(), scopes)?;
                        tokens.insert(&key, t.clone(), lifetime);
                        t
                    }
                };
                Ok(SentAuth { header: Some(format!("Bearer {token}")), token: Some((key, token)) })
            }
        }
    }

    /// Digests a 401 from `host`: remembers its challenge and drops a
    /// refused token. Returns true if trying again with new authorization
    /// can help.
    pub fn on_unauthorized(&self, host: &str, response: &reqwest::blocking::Response, sent: &SentAuth, scopes: &mut Vec<String>) -> Result<bool> {
        let challenge = response.headers().get_all(WWW_AUTHENTICATE).iter().filter_map(|v| v.to_str().ok()).find_map(AuthChallenge::parse);
        let Some(challenge) = challenge else { return Ok(false) };
        let had_credentials = self.credentials_for(host)?.is_some();
        let mut hosts = self.hosts.lock().map_err(|_| RegistryError::Config("authentication state poisoned".into()))?;
        let state = hosts.entry(host.to_string()).or_default();
        let known_before = state.challenge.as_ref().map(std::mem::discriminant) == Some(std::mem::discriminant(&challenge));
        let retry = match &challenge {
            AuthChallenge::Basic => had_credentials && sent.header.is_none(),
            AuthChallenge::Bearer { scope, error, .. } => {
                let mut widened = false;
                if let Some(scope) = scope {
                    for s in scope.split(' ').filter(|s| !s.is_empty()) {
                        if !scopes.iter().any(|have| have == s) && error.as_deref() == Some("insufficient_scope") {
                            scopes.push(s.to_string());
                            widened = true;
                        }
                    }
                }
                if let Some((key, token)) = &sent.token {
                    state.tokens.invalidate(key, token);
                }
                sent.token.is_some() || !known_before || widened
            }
        };
        state.challenge = Some(challenge);
        Ok(retry)
    }

    fn fetch_token(&self, http: &Client, retry: &RetryPolicy, host: &str, realm: &str, service: Option<&str>, scopes: &[String]) -> Result<(String, Duration)> {
        let what = "getting a bearer token".to_string();
        let mut url = Url::parse(realm).map_err(|_| RegistryError::BadResponse { host: host.into(), what: what.clone(), reason: format!("token realm {realm:?} is not a URL") })?;
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(RegistryError::BadResponse { host: host.into(), what, reason: format!("token realm {realm:?} is not http(s)") });
        }
        if let Some(reason) = self.realms.refuses(&url) {
            return Err(RegistryError::BadResponse { host: host.into(), what, reason });
        }
        let credentials = self.credentials_for(host)?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
            if let Some(c) = &credentials {
                q.append_pair("account", &c.username);
            }
        }
        let token_host = url.host_str().unwrap_or("?").to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = http.get(url.clone());
            if let Some(c) = &credentials {
                req = req.header(AUTHORIZATION, c.basic_header());
            }
            let failure = match req.send() {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        let body = read_token_body(resp).map_err(|reason| RegistryError::Network { host: token_host.clone(), what: what.clone(), reason });
                        match body {
                            Ok(body) => {
                                let (token, lifetime) = parse_token_answer(&body).map_err(|reason| RegistryError::BadResponse {
                                    host: token_host.clone(),
                                    what: what.clone(),
                                    reason: reason.into(),
                                })?;
                                self.tokens_fetched.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!("registry {host}: got a bearer token for {:?} valid {lifetime:?}", scopes);
                                return Ok((token, lifetime));
                            }
                            Err(e) => e,
                        }
                    } else if status.as_u16() == 401 || status.as_u16() == 403 {
                        let reason = if credentials.is_some() {
                            "the token server refused the credentials".to_string()
                        } else {
                            "the token server wants credentials (use --creds or a docker config)".to_string()
                        };
                        return Err(RegistryError::Unauthorized { host: host.into(), what, reason });
                    } else if status.is_server_error() || status.as_u16() == 429 {
                        RegistryError::Http { host: token_host.clone(), what: what.clone(), status: status.as_u16(), message: String::new() }
                    } else {
                        return Err(RegistryError::Http { host: token_host, what, status: status.as_u16(), message: String::new() });
                    }
                }
                Err(e) => RegistryError::Network { host: token_host.clone(), what: what.clone(), reason: crate::registry_client::describe_reqwest_error(&e) },
            };
            if attempt >= retry.max_attempts.max(1) {
                return Err(failure);
            }
            std::thread::sleep(retry.delay(attempt, None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_http_realm_of_an_https_registry_is_refused() {
        let policy = RealmPolicy { https_registry: true, insecure_hosts: vec!["auth.lan:8080".into()] };
        let url = |u: &str| Url::parse(u).unwrap();
        assert!(policy.refuses(&url("https://auth.example/token")).is_none());
        let why = policy.refuses(&url("http://auth.example/token")).expect("refused");
        assert!(why.contains("plain HTTP") && why.contains("auth.example"), "{why}");
        assert!(policy.refuses(&url("http://127.0.0.1:5001/token")).is_none(), "loopback is plain HTTP anyway");
        assert!(policy.refuses(&url("http://auth.lan:8080/token")).is_none(), "listed as insecure");
        let plain = RealmPolicy { https_registry: false, insecure_hosts: vec![] };
        assert!(plain.refuses(&url("http://auth.example/token")).is_none(), "an HTTP registry's realm may be HTTP");
    }

    #[test]
    fn token_answers_are_read_bounded() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for size in [MAX_TOKEN_ANSWER + 1, 100] {
                let (mut c, _) = listener.accept().unwrap();
                let mut req = [0u8; 4096];
                let _ = c.read(&mut req);
                let _ = write!(c, "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
                let chunk = vec![b'a'; 64 << 10];
                let mut left = size as usize;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if c.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
            }
        });
        let client = Client::new();
        let big = client.get(format!("http://{addr}/token")).send().unwrap();
        let e = read_token_body(big).expect_err("an over-long answer is refused");
        assert!(e.contains("larger than"), "{e}");
        let small = client.get(format!("http://{addr}/token")).send().unwrap();
        assert_eq!(read_token_body(small).unwrap().len(), 100);
    }
}
