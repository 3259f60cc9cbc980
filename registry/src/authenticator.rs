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
use crate::token_cache::{scope_key, TokenCache, DEFAULT_TOKEN_LIFETIME};

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
    hosts: Mutex<HashMap<String, HostAuth>>,
    /// Tokens fetched from token servers, for statistics and tests.
    pub tokens_fetched: AtomicU64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("credentials", &self.credentials).finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(credentials: CredentialStore) -> Self {
        Authenticator { credentials, hosts: Mutex::new(HashMap::new()), tokens_fetched: AtomicU64::new(0) }
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
                        let body = resp.bytes().map_err(|e| RegistryError::Network {
                            host: token_host.clone(),
                            what: what.clone(),
                            reason: crate::registry_client::describe_reqwest_error(&e),
                        });
                        match body {
                            Ok(body) => {
                                let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| RegistryError::BadResponse {
                                    host: token_host.clone(),
                                    what: what.clone(),
                                    reason: "token server's answer is not JSON".into(),
                                })?;
                                let token = answer.token.filter(|t| !t.is_empty()).or(answer.access_token.filter(|t| !t.is_empty()));
                                let token = token.ok_or_else(|| RegistryError::BadResponse {
                                    host: token_host.clone(),
                                    what: what.clone(),
                                    reason: "token server's answer has no token".into(),
                                })?;
                                let lifetime = match answer.expires_in {
                                    Some(s) if s > 0 => Duration::from_secs(s as u64),
                                    _ => DEFAULT_TOKEN_LIFETIME,
                                };
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
