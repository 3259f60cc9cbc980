//! [`TokenCache`]: bearer tokens by scope set, each kept until shortly
//! before it expires, or until the registry rejects it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The lifetime the token spec gives a token whose answer has no `expires_in`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

struct CachedToken {
    token: String,
    renew_at: Instant,
}

/// Tokens keyed by their sorted, space-joined scopes.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, CachedToken>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.tokens.lock().map(|t| t.len()).unwrap_or(0);
        write!(f, "TokenCache({n} tokens, <redacted>)")
    }
}

/// The cache key for a set of scopes (order and duplicates do not matter).
pub fn scope_key(scopes: &[String]) -> String {
    let mut s: Vec<&str> = scopes.iter().map(String::as_str).collect();
    s.sort_unstable();
    s.dedup();
    s.join(" ")
}

impl TokenCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The token for `key` if it is not about to expire.
    pub fn get(&self, key: &str) -> Option<String> {
        let tokens = self.tokens.lock().ok()?;
        tokens.get(key).filter(|t| Instant::now() < t.renew_at).map(|t| t.token.clone())
    }

    /// Stores a token valid for `lifetime`; it is renewed a little early
    /// (a tenth of its lifetime, at most 10 s) so a request never carries
    /// one that expires in flight.
    pub fn insert(&self, key: &str, token: String, lifetime: Duration) {
        let margin = (lifetime / 10).min(Duration::from_secs(10));
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(key.to_string(), CachedToken { token, renew_at: Instant::now() + lifetime - margin });
        }
    }

    /// Forgets `key`'s token, if it is still `token` (the registry refused it).
    pub fn invalidate(&self, key: &str, token: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            if tokens.get(key).is_some_and(|t| t.token == token) {
                tokens.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_and_invalidation() {
        let c = TokenCache::new();
        let k = scope_key(&["repository:b:pull".into(), "repository:a:pull".into(), "repository:a:pull".into()]);
        assert_eq!(k, "repository:a:pull repository:b:pull");
        c.insert(&k, "t1".into(), Duration::from_secs(60));
        assert_eq!(c.get(&k).as_deref(), Some("t1"));
        c.invalidate(&k, "other");
        assert_eq!(c.get(&k).as_deref(), Some("t1"));
        c.invalidate(&k, "t1");
        assert_eq!(c.get(&k), None);
        c.insert(&k, "t2".into(), Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.get(&k), None);
        assert!(!format!("{c:?}").contains("t2"));
    }
}
