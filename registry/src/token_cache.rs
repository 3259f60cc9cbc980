//! [`TokenCache`]: bearer tokens by scope set, each kept until shortly
//! before it expires, or until the registry rejects it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The lifetime the token spec gives a token whose answer has no `expires_in`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// The longest a token is kept, whatever its server says (`expires_in`
/// is the server's word: a hostile one must not overflow a deadline).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

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
        let lifetime = lifetime.min(MAX_TOKEN_LIFETIME);
        let margin = (lifetime / 10).min(Duration::from_secs(10));
        let now = Instant::now();
        let renew_at = now.checked_add(lifetime - margin).unwrap_or(now);
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(key.to_string(), CachedToken { token, renew_at });
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

    #[test]
    fn a_huge_lifetime_neither_panics_nor_lives_forever() {
        let c = TokenCache::new();
        c.insert("k", "t".into(), Duration::from_secs(i64::MAX as u64));
        c.insert("k", "t".into(), Duration::MAX);
        assert_eq!(c.get("k").as_deref(), Some("t"));
    }
}
